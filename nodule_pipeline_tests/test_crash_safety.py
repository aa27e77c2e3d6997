"""Crash safety of stored artefacts: writers killed with SIGKILL mid-write, and concurrent writers.

Writers run in real subprocesses (:mod:`nodule_pipeline_tests.crash_writer`), told to stop at one
step of a write (a temporary half written, the old version moved aside, the new one moved in...)
and killed there by pid, at every step in turn; afterwards the artefact must load as the version
that step leaves (the previous one, or the new one once it was moved in; checked by content
hash), and a rerun completes and clears what the dead writer left.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.hashing.index import build_index, load_index, save_index
from nodule_pipeline.roi_table import read_roi_table, write_roi_table
from nodule_pipeline.storage import prune_model_versions
from nodule_pipeline_tests.crash_writer import STOPS

REPO = Path(__file__).resolve().parents[1]
REACH_S = 120.0
"""How long a writer may take to reach its step: a hang detector, the kill waits for the step."""
INDEX_STEPS = {
    "half filled": (False, (True, 0, 1)),
    "old moved aside": (False, (False, 1, 1)),
    "new moved in": (True, (True, 1, 0)),
}
"""Per step an index writer is killed at: whether its version is stored, and what it leaves:
(whether ``hash_index`` exists, old indexes moved aside, temporary folders)."""
ROIS_STEPS = {"half written": (False, 1), "written, not renamed": (False, 1), "renamed": (True, 0)}
"""Per step a ROI table writer is killed at: whether its version is stored, and the temporary
files it leaves."""

Writers = Callable[..., subprocess.Popen]


@pytest.fixture
def writers() -> Iterator[Writers]:
    """Starts writers; the ones still running when the test ends are killed by pid."""
    started: list[subprocess.Popen] = []

    def start(kind: str, target: Path, first: int, count: int, step: str | None = None) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "nodule_pipeline_tests.crash_writer", kind, str(target), str(first), str(count)]
            + ([step] if step else []),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _kill_at(writers: Writers, kind: str, target: Path, version: int, step: str) -> None:
    """Start a writer of ``version`` that stops at ``step``; SIGKILL it there, by its pid."""
    writer = writers(kind, target, version, 1, step)
    expected, seen = f"paused {step}\n".encode(), b""
    deadline = time.monotonic() + REACH_S
    with selectors.DefaultSelector() as selector:
        selector.register(writer.stdout, selectors.EVENT_READ)
        while not seen.endswith(expected):
            if not selector.select(deadline - time.monotonic()):
                pytest.fail(f"the {kind} writer did not reach {step!r} in {REACH_S:.0f} s")
            chunk = os.read(writer.stdout.fileno(), 4096)
            if not chunk:
                pytest.fail(f"the {kind} writer exited ({writer.wait()}) before {step!r}: {seen!r}")
            seen += chunk
    writer.kill()
    assert writer.wait() == -signal.SIGKILL


def _leftovers(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def _save_small_index(folder: Path, model_version: str) -> None:
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"patient_id": ["P0"] * 10, "nodule_id": [str(i) for i in range(10)]})
    save_index(
        build_index(rng.random((10, 64)) < 0.5, rng.random((10, 8)), np.zeros(10, np.int8), items, model_version),
        folder,
    )


def test_an_index_writer_killed_at_each_step_leaves_a_whole_index(tmp_path: Path, writers: Writers) -> None:
    assert list(INDEX_STEPS) == list(STOPS["index"])
    folder = tmp_path / "hash_index"
    _save_small_index(folder, "first")
    stored = "first"
    for number, (step, (lands, left)) in enumerate(INDEX_STEPS.items(), start=1):
        _kill_at(writers, "index", folder, 1000 * number, step)
        aside, filling = _leftovers(tmp_path, ".hash_index.old-*"), _leftovers(tmp_path, ".hash_index.*~*~*")
        assert (folder.exists(), len(aside), len(filling)) == left, step  # killed where it was told to stop
        stored = f"m{1000 * number}" if lands else stored
        # content hash matches its manifest: no mix of versions; a swap cut short is finished
        assert load_index(folder, verify=True).model_version == stored, step
    writer = writers("index", folder, 9000, 1)  # a rerun completes and clears the dead's temporaries
    assert writer.wait(timeout=120) == 0
    assert load_index(folder, verify=True).model_version == "m9000"
    assert {p.name for p in tmp_path.iterdir()} == {"hash_index", ".hash_index.lock"}


def test_a_roi_table_writer_killed_at_each_step_leaves_a_whole_table(tmp_path: Path, writers: Writers) -> None:
    assert list(ROIS_STEPS) == list(STOPS["rois"])
    target = tmp_path / "nodule_rois" / "P" / "rois.parquet"
    write_roi_table(
        pd.DataFrame(
            {"patient_id": ["P"], "nodule_id": ["0"], "label": np.int8([0]), "image": [np.zeros(1024, np.float32)]}
        ),
        target,
    )
    stored = 0
    for number, (step, (lands, left)) in enumerate(ROIS_STEPS.items(), start=1):
        _kill_at(writers, "rois", target, 1000 * number, step)
        assert len(_leftovers(target.parent, ".rois.parquet.*.tmp")) == left, step  # killed where it was told to stop
        stored = 1000 * number if lands else stored
        table = read_roi_table(target)
        value = float(table["image"].iloc[0][0])
        assert (value, len(table)) == (stored, 200 + stored if stored else 1), step  # rows and pixels of one version
    writer = writers("rois", target, 9000, 1)  # a rerun completes and clears the dead's temporaries
    assert writer.wait(timeout=120) == 0
    assert len(read_roi_table(target)) == 9200
    assert {p.name for p in target.parent.iterdir()} == {"rois.parquet"}


def test_a_swap_interrupted_between_its_renames_is_finished_by_the_next_reader(tmp_path: Path) -> None:
    folder = tmp_path / "hash_index"
    _save_small_index(folder, "kept")
    os.replace(folder, tmp_path / ".hash_index.old-12345")  # killed right after moving the old one aside
    assert load_index(folder).model_version == "kept"


def test_two_concurrent_writers_leave_one_valid_index(tmp_path: Path, writers: Writers) -> None:
    folder = tmp_path / "hash_index"
    both = [writers("index", folder, first, 8) for first in (100, 200)]
    outputs = [w.communicate(timeout=600)[0] for w in both]
    assert [w.returncode for w in both] == [0, 0]
    index = load_index(folder, verify=True)
    assert index.model_version in {"m107", "m207"}  # the last swap of one of them, whole
    assert all(len(out.split()) == 8 for out in outputs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hash_index.") and not p.name.endswith(".lock")]


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
