"""The runs ``test_write_faults`` judges, made inside a private mount namespace (``unshare``),
where the artefacts folder is its own small tmpfs, as a production data volume would be its own
mount: after a good run the volume is filled to the last byte, then made read-only, and the
victim patient (with the library) is rerun each time, and again once the fault is undone.
What each run answered and what stayed stored is written as JSON for the test to check.

A user namespace maps an unprivileged caller to root inside it, where mounting a tmpfs is
allowed, so no real root is needed; and the mount goes when the process ends, however it ends.

``python -m nodule_pipeline_tests.fault_volume LIDC_ROOT DATA_DIR REPORT``
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nodule_pipeline.resources import load_artefact
from nodule_pipeline.runner import INGESTION_ASSET_NAMES, LIBRARY_ASSET_NAMES, RunSummary, run_pipeline
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.conftest import QUICK_TRAINING

PATIENTS = ("LIDC-IDRI-0078", "LIDC-IDRI-0957")
VICTIM = PATIENTS[1]
VOLUME_SIZE = "160m"
FILLER = "filler.bin"
FULL_DISK, READ_ONLY = "full disk", "read-only"


def mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


def _remount(volume: Path, mode: str) -> None:
    """Make the mount of ``volume`` read-only (``ro``) or writable again (``rw``). The kernel
    refuses read-only while a file on it is open for writing; say which of this process's open
    files are on it if that persists."""
    gc.collect()
    for _ in range(20):
        result = mount("-o", f"remount,{mode},bind", str(volume))
        if result.returncode == 0:
            return
        time.sleep(0.25)
    open_here = [os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if os.path.exists(fd)]
    raise RuntimeError(f"{result.stderr.strip()}; open: {[f for f in open_here if f.startswith(str(volume))]}")


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
                if error.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    return written


def _load_everything(artefacts: Path) -> None:
    """Every stored artefact still loads (one that does not ends this process with its error)."""
    for patient_id in PATIENTS:
        for name in INGESTION_ASSET_NAMES:
            load_artefact(artefact_folder(artefacts, [name], patient_id))
    for name in LIBRARY_ASSET_NAMES[:-1]:
        load_artefact(artefact_folder(artefacts, [name]))


def _answered(summary: RunSummary) -> dict[str, Any]:
    return {
        "outcomes": [{"patient_id": o.patient_id, "ok": o.ok, "error": o.error} for o in summary.outcomes],
        "library_ok": summary.library_ok,
    }


def _run(root: Path, data_dir: Path, **options: Any) -> dict[str, Any]:
    quiet = {"progress": lambda _: None, "training": QUICK_TRAINING, "report": "none"}
    return _answered(run_pipeline(root, data_dir, **quiet, **options))


def _fault(root: Path, data_dir: Path, make: Callable[[], object], undo: Callable[[], None]) -> dict[str, Any]:
    """The victim rerun under a fault and again once it is undone, with what making the fault
    gave and what was stored before and after the faulty rerun (which must all still load)."""
    artefacts = artefacts_dir(data_dir)
    case = {"before": _stored_files(artefacts), "made": make()}
    try:
        case["rerun"] = _run(root, data_dir, patients=[VICTIM], rerun=True)
        case["after"] = _stored_files(artefacts)
        _load_everything(artefacts)
    finally:
        undo()
    case["again"] = _run(root, data_dir, patients=[VICTIM], rerun=True)
    return case


def main(root: Path, data_dir: Path, report: Path) -> None:
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine can be far slower than one
    artefacts = artefacts_dir(data_dir)
    artefacts.mkdir()
    mounted = mount("-t", "tmpfs", "-o", f"size={VOLUME_SIZE}", "tmpfs", str(artefacts))
    if mounted.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs in the namespace: {mounted.stderr.strip()}")
    cases: dict[str, Any] = {"first": _run(root, data_dir)}
    cases[FULL_DISK] = _fault(root, data_dir, lambda: _fill(artefacts), (artefacts / FILLER).unlink)
    cases[READ_ONLY] = _fault(root, data_dir, lambda: _remount(artefacts, "ro"), lambda: _remount(artefacts, "rw"))
    report.write_text(json.dumps(cases))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:]))
