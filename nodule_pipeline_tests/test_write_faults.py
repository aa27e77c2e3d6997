"""A write error never costs a stored result: a full disk and a read-only file system, for real.

The runs happen in :mod:`nodule_pipeline_tests.fault_volume`, in a private mount namespace where the
artefacts folder is its own small tmpfs: after a good run the volume is filled to the last byte,
then made read-only; reruns of a patient and of the library must fail with an error that names
the artefact and the reason, leave every stored file byte-identical and loadable, and complete
once the fault is undone. As root the namespace is a mount namespace; otherwise a user namespace
maps the caller to root in it, so root is not needed where unprivileged user namespaces are
allowed. Where neither is, the module skips with the reason, and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline_tests.fault_volume import FULL_DISK, PATIENTS, READ_ONLY, VICTIM

REPO = Path(__file__).resolve().parents[1]
RUNS_LIMIT_S = 1200
"""A hang detector for the runs on the small volume (about 20 s on 2 cores)."""


def _namespace() -> list[str]:
    """``unshare`` for a private mount namespace in which this process may mount a tmpfs."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private"]


def _mounting_namespace(probe: Path) -> list[str]:
    """:func:`_namespace` once a tmpfs was mounted in it; otherwise a skip, or under CI=true a
    failure, that says what is missing."""
    command = _namespace()
    try:
        tried = subprocess.run(
            [*command, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as error:  # no unshare here
        problem = str(error)
    else:
        if tried.returncode == 0:
            return command
        problem = tried.stderr.strip()
    message = (
        f"cannot mount a small tmpfs in a private namespace ({' '.join(command)}: {problem}): "
        "this needs root, or unprivileged user namespaces"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (under CI=true this fails instead of skipping)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the runs on the small volume answered and stored (see :mod:`~nodule_pipeline_tests.fault_volume`)."""
    namespace = _mounting_namespace(tmp_path_factory.mktemp("probe"))
    root = tmp_path_factory.mktemp("lidc")
    for patient_id in PATIENTS:
        generate_patient(patient_id, root, seed=0)
    data_dir, report = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("report") / "faults.json"
    runs = subprocess.run(
        [*namespace, sys.executable, "-m", "nodule_pipeline_tests.fault_volume", str(root), str(data_dir), str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUNS_LIMIT_S,
        check=False,
    )
    if runs.returncode != 0:
        pytest.fail(f"the runs on the small volume ended with exit {runs.returncode}:\n{runs.stderr[-6000:]}")
    cases = json.loads(report.read_text())
    first = cases["first"]
    assert all(o["ok"] for o in first["outcomes"]) and first["library_ok"], first
    return cases


def _assert_clear_storage_failure(rerun: dict[str, Any], reason: str, code: str) -> None:
    (outcome,) = rerun["outcomes"]
    assert not outcome["ok"]
    assert f"artefacts/lidc_scan/{VICTIM}" in outcome["error"]  # names the artefact, so the patient
    assert reason in outcome["error"] and f"({code})" in outcome["error"] and "kept" in outcome["error"]
    assert rerun["library_ok"] is False  # the library rerun hit the same wall and kept its results


def _assert_kept_and_completed_after(case: dict[str, Any]) -> None:
    # nothing changed, nothing half-written left behind; every artefact loaded where it is mounted
    assert case["before"] and case["after"] == case["before"]
    again = case["again"]
    assert all(o["ok"] for o in again["outcomes"]) and again["library_ok"], again


def test_a_full_disk_fails_clearly_and_keeps_every_stored_result(faults: dict[str, Any]) -> None:
    case = faults[FULL_DISK]
    assert case["made"] > 0  # bytes written until the volume was full
    _assert_clear_storage_failure(case["rerun"], "No space left on device", "ENOSPC")
    _assert_kept_and_completed_after(case)


def test_a_read_only_target_fails_clearly_and_keeps_every_stored_result(faults: dict[str, Any]) -> None:
    case = faults[READ_ONLY]
    _assert_clear_storage_failure(case["rerun"], "Read-only file system", "EROFS")
    _assert_kept_and_completed_after(case)
