"""A write error never costs a stored result: a full disk and a read-only file system, for real.

The artefacts folder is its own small tmpfs (as a production data volume would be its own
mount). After a good run, the volume is filled to the last byte and then remounted read-only;
reruns of a patient and of the library must fail with an error that names the artefact and the
reason, leave every stored file byte-identical and loadable, and complete once space is back.
Mounting needs root (CI runs as root); elsewhere the module is skipped with the reason.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.resources import load_artefact
from nodule_pipeline.runner import LIBRARY_ASSET_NAMES, RunSummary, run_pipeline
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.conftest import QUICK_TRAINING

PATIENTS = ("LIDC-IDRI-0078", "LIDC-IDRI-0957")
VICTIM = PATIENTS[1]
VOLUME_SIZE = "160m"
FILLER = "filler.bin"


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def _remount_read_only(volume: Path) -> None:
    """Remount ``volume`` read-only. The kernel refuses while a file on it is open for writing;
    say which of this process's open files are on it if that persists."""
    gc.collect()
    for _ in range(20):
        result = _mount("-o", "remount,ro", str(volume))
        if result.returncode == 0:
            return
        time.sleep(0.25)
    open_here = [os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if os.path.exists(fd)]
    pytest.fail(f"{result.stderr.strip()}; open: {[f for f in open_here if f.startswith(str(volume))]}")


def _stored_files(artefacts: Path) -> dict[str, str]:
    """SHA-256 of every stored file (locks and the filler aside)."""
    return {
        str(path.relative_to(artefacts)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(artefacts.rglob("*"))
        if path.is_file() and not path.name.endswith(".lock") and path.name != FILLER
    }


def _fill(volume: Path) -> int:
    """Write zeros until the file system refuses: the disk is now full."""
    written = 0
    with open(volume / FILLER, "wb", buffering=0) as handle:
        chunk = bytes(1 << 20)
        while True:
            try:
                written += handle.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    return written


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    """A generated scan root and a data dir whose artefacts live on a fresh, small tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    root = tmp_path_factory.mktemp("lidc")
    for patient_id in PATIENTS:
        generate_patient(patient_id, root, seed=0)
    data_dir = tmp_path_factory.mktemp("data")
    artefacts = artefacts_dir(data_dir)
    artefacts.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", f"size={VOLUME_SIZE}", "tmpfs", str(artefacts))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        summary = run_pipeline(root, data_dir, progress=lambda _: None, training=QUICK_TRAINING, report="none")
        assert not summary.failed and summary.library_ok
        yield root, data_dir, artefacts
    finally:
        _mount("-o", "remount,rw", str(artefacts))
        subprocess.run(["umount", "-l", str(artefacts)], check=False)


def _rerun(root: Path, data_dir: Path) -> RunSummary:
    return run_pipeline(
        root,
        data_dir,
        patients=[VICTIM],
        progress=lambda _: None,
        training=QUICK_TRAINING,
        report="none",
        rerun=True,
    )


def _assert_everything_kept(artefacts: Path, before: dict[str, str]) -> None:
    assert _stored_files(artefacts) == before  # nothing changed, nothing half-written left behind
    for patient_id in PATIENTS:
        for name in ("lidc_scan", "lung_mask", "nodule_rois"):
            load_artefact(artefact_folder(artefacts, [name], patient_id))
    for name in LIBRARY_ASSET_NAMES[:-1]:
        load_artefact(artefact_folder(artefacts, [name]))


def _assert_clear_storage_failure(summary: RunSummary, reason: str, code: str) -> None:
    (outcome,) = summary.outcomes
    assert not outcome.ok
    assert f"artefacts/lidc_scan/{VICTIM}" in outcome.error  # names the artefact, so the patient
    assert reason in outcome.error and f"({code})" in outcome.error and "kept" in outcome.error
    assert summary.library_ok is False  # the library rerun hit the same wall and kept its results


def test_a_full_disk_fails_clearly_and_keeps_every_stored_result(volume) -> None:
    root, data_dir, artefacts = volume
    before = _stored_files(artefacts)
    assert _fill(artefacts) > 0
    try:
        summary = _rerun(root, data_dir)
        _assert_clear_storage_failure(summary, "No space left on device", "ENOSPC")
        _assert_everything_kept(artefacts, before)
    finally:
        (artefacts / FILLER).unlink()
    again = _rerun(root, data_dir)
    assert not again.failed and again.library_ok


def test_a_read_only_target_fails_clearly_and_keeps_every_stored_result(volume) -> None:
    root, data_dir, artefacts = volume
    before = _stored_files(artefacts)
    _remount_read_only(artefacts)
    try:
        summary = _rerun(root, data_dir)
        _assert_clear_storage_failure(summary, "Read-only file system", "EROFS")
        _assert_everything_kept(artefacts, before)
    finally:
        assert _mount("-o", "remount,rw", str(artefacts)).returncode == 0
    again = _rerun(root, data_dir)
    assert not again.failed and again.library_ok
