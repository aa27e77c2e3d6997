"""Crash safety of stored artefacts: writers killed with SIGKILL mid-write, and concurrent writers.

Writers run in real subprocesses that are killed at random moments; afterwards the artefact
must load (the previous version or the new one, checked by content hash) and a rerun completes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.hashing.index import build_index, load_index, save_index
from nodule_pipeline.roi_table import read_roi_table, write_roi_table
from nodule_pipeline.storage import prune_model_versions

ITEMS = 40_000
WRITER = f"""
import sys
import numpy as np
import pandas as pd
from pathlib import Path
from nodule_pipeline.hashing.index import build_index, save_index
from nodule_pipeline.roi_table import write_roi_table
kind, target, first, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for version in range(first, first + count):
    if kind == "index":
        rng = np.random.default_rng(version)
        n = {ITEMS}
        ids = [str(i) for i in range(n)]
        items = pd.DataFrame({{"patient_id": [f"P{{i % 50}}" for i in range(n)], "nodule_id": ids}})
        codes, fc, labels = rng.random((n, 256)) < 0.5, rng.random((n, 128)), rng.integers(0, 2, n)
        index = build_index(codes, fc, labels, items, f"m{{version}}")
        save_index(index, target)
    else:
        rows = 200 + version
        table = pd.DataFrame({{"patient_id": ["P"] * rows, "nodule_id": [str(i) for i in range(rows)],
                              "label": np.zeros(rows, np.int8), "image": [np.full(1024, version, np.float32)] * rows}})
        write_roi_table(table, target)
    print(version, flush=True)
"""


def _writer(kind: str, target: Path, first: int, count: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, str(target), str(first), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _kill_at_random(kind: str, target: Path, kills: int, seed: int) -> list[int]:
    """Start a writer of many versions and SIGKILL it at a random moment, ``kills`` times."""
    rng = random.Random(seed)
    completed: list[int] = []
    for attempt in range(kills):
        writer = _writer(kind, target, first=1000 * (attempt + 1), count=50)
        time.sleep(rng.uniform(0.3, 2.0))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate()
        completed += [int(line) for line in out.split()]
    return completed


def _save_small_index(folder: Path, model_version: str) -> None:
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"patient_id": ["P0"] * 10, "nodule_id": [str(i) for i in range(10)]})
    save_index(
        build_index(rng.random((10, 64)) < 0.5, rng.random((10, 8)), np.zeros(10, np.int8), items, model_version),
        folder,
    )


def test_an_index_writer_killed_mid_write_leaves_a_whole_index(tmp_path: Path) -> None:
    folder = tmp_path / "hash_index"
    _save_small_index(folder, "first")
    completed = _kill_at_random("index", folder, kills=6, seed=1)
    index = load_index(folder, verify=True)  # content hash matches its manifest: no mix of versions
    written = {"first"} | {f"m{v}" for v in completed}
    in_flight = {f"m{v + 1}" for v in completed} | {f"m{1000 * k}" for k in range(1, 7)}
    assert index.model_version in written | in_flight  # the old one, or one whose swap completed
    writer = _writer("index", folder, first=9000, count=1)  # a rerun completes and clears the dead's temporaries
    assert writer.wait(timeout=120) == 0
    assert load_index(folder, verify=True).model_version == "m9000"
    assert {p.name for p in tmp_path.iterdir()} == {"hash_index", ".hash_index.lock"}


def test_a_roi_table_writer_killed_mid_write_leaves_a_whole_table(tmp_path: Path) -> None:
    target = tmp_path / "nodule_rois" / "P" / "rois.parquet"
    write_roi_table(
        pd.DataFrame(
            {"patient_id": ["P"], "nodule_id": ["0"], "label": np.int8([0]), "image": [np.zeros(1024, np.float32)]}
        ),
        target,
    )
    _kill_at_random("rois", target, kills=6, seed=2)
    table = read_roi_table(target)
    value = float(table["image"].iloc[0][0])
    assert len(table) == (1 if value == 0 else 200 + int(value))  # rows and pixels from one version
    writer = _writer("rois", target, first=9000, count=1)  # a rerun completes and clears the dead's temporaries
    assert writer.wait(timeout=120) == 0
    assert len(read_roi_table(target)) == 9200
    assert {p.name for p in target.parent.iterdir()} == {"rois.parquet"}


def test_a_swap_interrupted_between_its_renames_is_finished_by_the_next_reader(tmp_path: Path) -> None:
    folder = tmp_path / "hash_index"
    _save_small_index(folder, "kept")
    os.replace(folder, tmp_path / ".hash_index.old-12345")  # killed right after moving the old one aside
    assert load_index(folder).model_version == "kept"


def test_two_concurrent_writers_leave_one_valid_index(tmp_path: Path) -> None:
    folder = tmp_path / "hash_index"
    writers = [_writer("index", folder, first=first, count=8) for first in (100, 200)]
    outputs = [w.communicate(timeout=600)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    index = load_index(folder, verify=True)
    assert index.model_version in {"m107", "m207"}  # the last swap of one of them, whole
    assert all(len(out.split()) == 8 for out in outputs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hash_index.") and not p.name.endswith(".lock")]


@pytest.fixture(autouse=True)
def _no_stray_writers():
    yield
    os.system("pkill -9 -f 'nodule_pipeline.hashing.index import build_index' >/dev/null 2>&1")


def test_old_model_versions_are_pruned_but_not_the_one_in_use(tmp_path: Path) -> None:
    versions = tmp_path / "hash_model_versions"
    for age, name in enumerate(f"m{i}" for i in range(8)):  # m0 oldest, m7 newest
        (versions / name).mkdir(parents=True)
        (versions / name / "weights.pt").write_bytes(b"w")
        os.utime(versions / name, ns=(1_000_000_000 * (age + 1),) * 2)
    deleted = prune_model_versions(tmp_path, in_use={"m0"}, newest=5)
    assert sorted(deleted) == ["m1", "m2"]
    kept = sorted(p.name for p in versions.iterdir() if not p.name.startswith("."))
    assert kept == ["m0", "m3", "m4", "m5", "m6", "m7"]
    assert prune_model_versions(tmp_path, in_use={"m0"}, newest=5) == []
