"""Latency of the search server: p50 and p99 of ``POST /api/search`` over HTTP at 10^5 items.

Builds a data dir holding a network with its initial (untrained) weights, saved as the model
(encoding a ROI costs the same whatever the weights), and an index of ``items`` items built with
it: random 256-bit codes, float16 ``fc`` features, int16 ROIs, ids and the nine reader ratings,
about three nodules a patient. Starts ``nodule-pipeline serve`` on it in its own process, with a
token as a department would run it (each request sends it as a Bearer header, and is audited),
and times requests from this one over one keep-alive connection, taking turns:

- a library-nodule query (``{"nodule_id": ...}``: its ROI encoded, hierarchical search with its
  own patient left out, 10 hits as JSON with ratings, the query picture);
- an image query (``{"image": [1024 HU values]}``, the same search).

Each request takes turns with the same search in this process through ``NoduleSearcher`` (no
HTTP, no JSON, no pictures), so both see the same machine load: the difference is what the server
adds. Figures only, never test assertions.

    python -m nodule_pipeline.benchmarks.serve [--items 100000] [--requests 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from nodule_pipeline.benchmarks import environment
from nodule_pipeline.benchmarks.search import _items, _percentile, _random_codes
from nodule_pipeline.lidc.annotations import CHARACTERISTICS, RATING_RANGES

K = 10


def build_library(data_dir: Path, items: int, seed: int = 0) -> None:
    """A model (initial weights) and an index of ``items`` random items built with it, where
    ``nodule-pipeline serve --data-dir data_dir`` finds them."""
    from nodule_pipeline.hashing.card import weights_fingerprint
    from nodule_pipeline.hashing.index import build_index, save_index
    from nodule_pipeline.hashing.network import HU_WINDOW, HashNet, NetworkConfig, NormalisationStats
    from nodule_pipeline.hashing.training import TrainConfig, TrainedModel, save_model
    from nodule_pipeline.storage import artefact_folder, artefacts_dir, model_version_folder

    rng = np.random.default_rng(seed)
    network = NetworkConfig()
    module = HashNet(network).eval()
    model = TrainedModel(module, network, TrainConfig(), NormalisationStats("hu", *HU_WINDOW))
    version = weights_fingerprint(module)
    base = artefacts_dir(data_dir)
    save_model(model, model_version_folder(base, version), card={"model_version": version})
    table = _items(items)
    table["annotation_id"] = table["nodule_id"] + "-r1"
    for name in CHARACTERISTICS:
        low, high = RATING_RANGES[name]
        table[name] = rng.integers(low, high + 1, items).astype(np.float64)
    index = build_index(
        _random_codes(rng, items, network.bits // 8),
        rng.standard_normal((items, network.fc_dim), dtype=np.float32).astype(np.float16),
        (table["malignancy"] > 3).to_numpy(),
        table,
        model_version=version,
        rois=np.rint(rng.normal(-700, 200, (items, 32, 32))),  # whole HU: stored as int16, as a real library
    )
    save_index(index, artefact_folder(base, ["hash_index"]))


def run_serve_benchmark(items: int = 10**5, requests: int = 200, seed: int = 0) -> dict[str, Any]:
    """Build the library, serve it, time ``requests`` requests of each kind; the figures in ms."""
    from nodule_pipeline.hashing.searcher import NoduleSearcher

    rng = np.random.default_rng(seed + 1)
    with tempfile.TemporaryDirectory(prefix="serve-benchmark-") as folder:
        data_dir = Path(folder)
        started = time.perf_counter()
        build_library(data_dir, items, seed)
        build_s = time.perf_counter() - started
        searcher = NoduleSearcher.from_data_dir(data_dir)
        nodules = sorted(searcher.rows_by_nodule())
        queries = [nodules[i] for i in rng.integers(0, len(nodules), requests)]
        images = [np.asarray(searcher.index.rois[i], dtype=np.float32) for i in rng.integers(0, items, requests)]
        bodies = {
            "nodule": [json.dumps({"nodule_id": nodule, "k": K}).encode() for nodule in queries],
            "image": [json.dumps({"image": image.ravel().tolist(), "k": K}).encode() for image in images],
        }
        with _served(data_dir) as (post, server_start_s):
            calls = {  # HTTP and in process take turns, request by request: both see the same load
                "http_nodule": [partial(post, body) for body in bodies["nodule"]],
                "in_process_nodule": [partial(searcher.search_nodule, nodule, K) for nodule in queries],
                "http_image": [partial(post, body) for body in bodies["image"]],
                "in_process_image": [partial(searcher.search_roi, image, K) for image in images],
            }
            searcher.search_nodule(queries[0], K)  # warm-up, untimed
            times: dict[str, list[float]] = {name: [] for name in calls}
            for turn in range(requests):
                for name, queue in calls.items():
                    clock = time.perf_counter()
                    queue[turn]()
                    times[name].append(time.perf_counter() - clock)
    figures: dict[str, Any] = {"items": items, "requests": requests, "k": K, "bits": searcher.index.bits}
    for name, seconds in times.items():
        figures[f"{name}_p50_ms"] = _percentile(seconds, 50)
        figures[f"{name}_p99_ms"] = _percentile(seconds, 99)
    figures.update(build_s=round(build_s, 1), server_start_s=round(server_start_s, 1), **environment())
    return figures


@contextmanager
def _served(data_dir: Path) -> Iterator[tuple[Callable[[bytes], None], float]]:
    """``nodule-pipeline serve`` on ``data_dir`` in its own process: a function that POSTs a body
    to ``/api/search`` over one keep-alive connection, and the seconds until it first answered."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from nodule_pipeline.serve.security import TOKEN_ENV

    command = [sys.executable, "-m", "nodule_pipeline.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)]
    token = secrets.token_urlsafe(32)
    started = time.perf_counter()
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, TOKEN_ENV: token},
    )
    try:
        connection = _connect(port, server)
        post = _poster(connection, token)
        post(json.dumps({"image": [-700.0] * 1024}).encode())  # the server loads the index on its first request
        yield post, time.perf_counter() - started
        connection.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _connect(port: int, server: subprocess.Popen, timeout: float = 120) -> http.client.HTTPConnection:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            connection.connect()
            return connection
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the server did not listen on port {port} in {timeout:.0f} s")


def _poster(connection: http.client.HTTPConnection, token: str) -> Callable[[bytes], None]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def post(body: bytes) -> None:
        connection.request("POST", "/api/search", body, headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"search failed: {response.status} {answer[:300]!r}")

    return post


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10**5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run_serve_benchmark(args.items, args.requests)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
