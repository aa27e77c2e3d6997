"""Start and stop the Dagster UI (``nodule-pipeline ui``) on a data dir for browser tests.

``dg dev`` (what ``nodule-pipeline ui`` runs) starts a webserver, a daemon and code servers;
started from a script it ignores SIGTERM, so it runs in its own process group, with SIGINT
restored, and is stopped through the whole group (SIGINT, then SIGTERM, then SIGKILL as a last
resort).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nodule_pipeline.resources import LIDC_ROOT_ENV

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prepare_child() -> None:
    """In the child before exec: take SIGINT back (a background shell may have ignored it) and,
    on Linux, get SIGINT should the test process die without its teardown (killed, timed out)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class DagsterUI:
    url: str
    process: subprocess.Popen
    log: Path

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        assert "errors" not in body, body
        return body["data"]


def wait_until_answering(process: subprocess.Popen, log: Path, url: str, what: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the end of the server's log if the process
    exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer at {url} in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _wait_code_location(ui: DagsterUI, timeout: float) -> None:
    """The webserver answers before the code server has loaded the definitions."""
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = ui.graphql(query)["workspaceOrError"].get("locationEntries", [])
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            return
        time.sleep(1)
    raise TimeoutError(f"the code location did not load in {timeout:.0f} s:\n{ui.log.read_text()[-4000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the whole group, each with a grace period."""
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children of the group (code servers, daemon) may linger briefly
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def processes_of(dagster_home: Path) -> list[int]:
    """Live processes started with ``DAGSTER_HOME=dagster_home`` (the server and all it spawned,
    wherever their process group)."""
    marker = f"DAGSTER_HOME={dagster_home}".encode()
    found: list[int] = []
    if not Path("/proc").is_dir():
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ and state != "Z":
            found.append(int(entry.name))
    return found


def stop(process: subprocess.Popen, dagster_home: Path) -> None:
    """Stop the server's group, then anything of this instance that left the group."""
    stop_process_group(process)
    deadline = time.monotonic() + 10
    while (stragglers := processes_of(dagster_home)) and time.monotonic() < deadline:
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def start_cli(arguments: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``nodule-pipeline ARGUMENTS`` from this checkout in its own process group, output to ``log``."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "nodule_pipeline.cli", *arguments],
            cwd=REPO,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_prepare_child,
        )


@contextmanager
def dagster_ui(data_dir: Path, lidc_root: Path, log: Path, timeout: float = 300) -> Iterator[DagsterUI]:
    """``nodule-pipeline ui --data-dir DATA_DIR`` on a free port of 127.0.0.1, until the block ends."""
    port = free_port()
    process = start_cli(["ui", "--data-dir", str(data_dir), "--port", str(port)], log, {LIDC_ROOT_ENV: str(lidc_root)})
    ui = DagsterUI(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_answering(process, log, f"{ui.url}/server_info", "nodule-pipeline ui", timeout)
        _wait_code_location(ui, timeout)
        yield ui
    finally:
        stop(process, data_dir.resolve() / "dagster")
