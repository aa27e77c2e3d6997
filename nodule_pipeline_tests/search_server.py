"""Start and stop ``nodule-pipeline serve`` for tests, and re-materialize the index it serves.

The server runs in its own process group and is stopped through it by process id (SIGINT, then
SIGTERM, then SIGKILL), as the Dagster UI of ``dagster_ui`` is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import AssetKey

from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.runner import open_instance
from nodule_pipeline_tests.dagster_ui import REPO, _prepare_child, free_port, stop_process_group


@dataclass
class SearchServer:
    url: str
    process: subprocess.Popen
    log: Path

    def request(self, path: str, body: bytes | None = None, content_type: str = "application/json"):
        """(status, headers, body bytes) of a GET, or a POST when ``body`` is given."""
        headers = {"Content-Type": content_type} if body is not None else {}
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
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


def _wait_ready(server: SearchServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log.read_text()[-4000:]}")
        try:
            server.request("/openapi.json")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    log = server.log.read_text()[-4000:]
    raise TimeoutError(f"the server did not answer at {server.url} in {timeout:.0f} s:\n{log}")


@contextmanager
def search_server(data_dir: Path, log: Path, *options: str, timeout: float = 120) -> Iterator[SearchServer]:
    """``nodule-pipeline serve --data-dir DATA_DIR`` on a free port of 127.0.0.1, until the block ends."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "nodule_pipeline.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, *options],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_prepare_child,
        )
    server = SearchServer(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(server, timeout)
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
