"""``nodule-pipeline serve`` for tests: started on a copy of the real sample's data dir with both
patients in the index (the ``served_library`` and ``search_page`` fixtures, one server for the
session; ``guarded``, a second one that asks for a token), stopped by process id through its
own process group (SIGINT, then SIGTERM, then SIGKILL) as the Dagster UI of ``dagster_ui`` is;
and the index re-materialized on a data dir.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey

from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.runner import open_instance
from nodule_pipeline.serve.security import TOKEN_ENV
from nodule_pipeline_tests.dagster_ui import free_port, start_cli, stop_process_group, wait_until_answering


@dataclass
class SearchServer:
    url: str
    process: subprocess.Popen
    log: Path

    def request(
        self,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ):
        """(status, headers, body bytes) of a GET, or a POST when ``body`` is given."""
        sent = {**({"Content-Type": content_type} if body is not None else {}), **(headers or {})}
        request = urllib.request.Request(self.url + path, data=body, headers=sent, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, body = self.request(path)
        return status, json.loads(body)

    def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        status, _, body = self.request(path, json.dumps(payload).encode())
        return status, json.loads(body)


@contextmanager
def search_server(
    data_dir: Path, log: Path, *options: str, timeout: float = 120, env: dict[str, str] | None = None
) -> Iterator[SearchServer]:
    """``nodule-pipeline serve --data-dir DATA_DIR`` on a free port of 127.0.0.1, until the block
    ends; ``env`` adds to its environment (the token)."""
    port = free_port()
    process = start_cli(["serve", "--data-dir", str(data_dir), "--port", str(port), *options], log, env)
    server = SearchServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_answering(process, log, f"{server.url}/openapi.json", "nodule-pipeline serve", timeout)
        yield server
    finally:
        stop_process_group(process)


def materialize_index(data_dir: Path, database: str) -> None:
    """``hash_index`` again on a data dir's instance, over the training split or ``all`` rows."""
    defs = build_definitions(data_dir)
    result = defs.resolve_job_def("build_library").execute_in_process(
        run_config={"ops": {"hash_index": {"config": {"database": database}}}},
        instance=open_instance(data_dir),
        asset_selection=[AssetKey("hash_index")],
        raise_on_error=True,
    )
    assert result.success


DAGSTER_URL = "http://127.0.0.1:3999"
"""The Dagster UI address the session's server is given, for its links to the assets."""


def served_copy(materialized: Path, folder: Path, database: str | None) -> Path:
    """A copy of the sample's data dir, its index rebuilt over ``database`` (None: no index)."""
    shutil.copytree(materialized, folder)
    shutil.rmtree(folder / "artefacts" / "hash_index")
    if database:
        materialize_index(folder, database)
    return folder


def series_zip(lidc_sample: Path, patient_id: str, out: Path) -> Path:
    """The patient's series folder (DICOM files and the LIDC XML) zipped, as a person would."""
    folder = next((lidc_sample / patient_id).rglob("*.dcm")).parent
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}")
    return out


@pytest.fixture(scope="session")
def served_library(materialized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's data dir with both patients in the index, so a nodule of one finds the other's."""
    return served_copy(materialized, tmp_path_factory.mktemp("served") / "data", "all")


@pytest.fixture(scope="session")
def search_page(served_library: Path) -> Iterator[SearchServer]:
    """``nodule-pipeline serve`` on :func:`served_library`, linking to a Dagster UI at :data:`DAGSTER_URL`."""
    with search_server(served_library, served_library / "serve.log", "--dagster-url", DAGSTER_URL) as running:
        yield running


TOKEN = "correct-horse-battery-staple-0123"
"""The token of :func:`guarded`."""
ALLOWED = "nodules.hospital.example"
"""The Host name :func:`guarded` answers to besides the loopback names (``--allowed-host``)."""


@pytest.fixture(scope="session")
def guarded(served_library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchServer]:
    """A second server on :func:`served_library`, started with :data:`TOKEN` and :data:`ALLOWED`."""
    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    with search_server(served_library, log, "--allowed-host", ALLOWED, env={TOKEN_ENV: TOKEN}) as running:
        yield running
