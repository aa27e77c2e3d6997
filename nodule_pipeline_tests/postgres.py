"""A throwaway PostgreSQL 15 server for tests: 127.0.0.1, a free port, a temp folder, trust auth.

``running_postgres()`` is the context manager; ``postgres_server`` the session fixture (made visible
to every test module by ``conftest.py``). PostgreSQL refuses to run as root, so under uid 0 the
server runs as the ``postgres`` system user that the Debian package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("NODULE_PIPELINE_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
DATABASE = "dagster_test"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    db: str
    password: str = ""  # trust authentication: any or no password

    @property
    def url(self) -> str:
        """libpq URI (``psycopg2.connect(url)``); SQLAlchemy needs the ``postgresql+psycopg2`` scheme."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.db}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list[str], as_postgres: bool, cwd: Path) -> None:
    if as_postgres:
        command = ["runuser", "-u", SUPERUSER, "--", *command]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


@contextmanager
def running_postgres(database: str = DATABASE) -> Iterator[PostgresServer]:
    """Start a fresh server, create ``database``, yield its settings; stop it and delete it after."""
    missing = [name for name in ("initdb", "pg_ctl", "createdb") if not (PG_BIN / name).is_file()]
    if missing:
        raise RuntimeError(
            f"PostgreSQL 15 binaries not found in {PG_BIN} (missing: {', '.join(missing)}). "
            "The PostgreSQL tests need a real server: .ci/run installs postgresql-15 "
            "(apt-get install postgresql-15), or set NODULE_PIPELINE_PG_BIN to its bin folder."
        )
    as_postgres = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="nodule-pg-"))
    data, log = folder / "data", folder / "server.log"
    if as_postgres:
        try:
            account = pwd.getpwnam(SUPERUSER)
        except KeyError as error:
            raise RuntimeError(
                "running as root, and PostgreSQL refuses root: the 'postgres' system user is needed "
                "(.ci/run installs postgresql-15, which creates it)"
            ) from error
        os.chown(folder, account.pw_uid, account.pw_gid)
    port = _free_port()
    started = False
    try:
        _run(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"],
            as_postgres,
            folder,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{folder}' -c fsync=off"
        _run(
            [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"], as_postgres, folder
        )
        started = True
        _run(
            [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER, database],
            as_postgres,
            folder,
        )
        yield PostgresServer(host="127.0.0.1", port=port, user=SUPERUSER, db=database)
    except RuntimeError as error:
        if log.exists() and not started:
            raise RuntimeError(f"{error}\nserver log:\n{log.read_text()}") from error
        raise
    finally:
        if started:
            _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], as_postgres, folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL 15 server for the test session."""
    with running_postgres() as server:
        yield server
