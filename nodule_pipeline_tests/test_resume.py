"""An interrupted backfill resumes with only what is missing.

A real ``nodule-pipeline run`` over three generated patients is killed with SIGKILL halfway
through the second patient (its scan stored, its ROIs not yet). The rerun closes the run the
killed process left "started", skips the finished patient without touching its files, does the
other two, and a third run finds everything current and executes nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterEvent, DagsterEventType, DagsterRunStatus, RunsFilter

from nodule_pipeline.concurrency import GPU_POOL
from nodule_pipeline.currency import latest_record
from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.resources import load_artefact
from nodule_pipeline.runner import RUNNER_TAG, close_orphaned_runs, open_instance, run_pipeline, stale_library
from nodule_pipeline.storage import artefact_folder, artefacts_dir, owner_tag
from nodule_pipeline_tests.conftest import QUICK_TRAINING

PATIENTS = ("LIDC-IDRI-0078", "LIDC-IDRI-0171", "LIDC-IDRI-0957")  # the order a run takes them
KILL_DEADLINE_S = 600


def _start_run(root: Path, data_dir: Path) -> subprocess.Popen:
    argv = ["run", "--lidc-root", str(root), "--data-dir", str(data_dir), "--report", "none", "--epochs", "2"]
    code = f"from nodule_pipeline.cli import main; raise SystemExit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_halfway_through_second_patient(process: subprocess.Popen, data_dir: Path) -> None:
    """SIGKILL as soon as the second patient's scan is stored: its mask and ROIs are not. (Watched
    on disk: opening the instance while the run creates it would race its schema set-up.)"""
    scan = artefact_folder(artefacts_dir(data_dir), ["lidc_scan"], PATIENTS[1])
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline and process.poll() is None:
        if scan.exists():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    process.kill()
    pytest.fail("the run never reached the second patient")


def _successful_ingest_runs(instance, patient_id: str) -> int:
    runs = instance.get_runs(
        RunsFilter(
            job_name="ingest_patient", statuses=[DagsterRunStatus.SUCCESS], tags={"dagster/partition": patient_id}
        )
    )
    return len(runs)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    root = tmp_path_factory.mktemp("lidc")
    for patient_id in PATIENTS:
        generate_patient(patient_id, root, seed=0)
    data_dir = tmp_path_factory.mktemp("data")
    _kill_halfway_through_second_patient(_start_run(root, data_dir), data_dir)
    return root, data_dir


def test_the_kill_left_a_half_done_backfill(interrupted) -> None:
    _, data_dir = interrupted
    instance = open_instance(data_dir)
    assert _successful_ingest_runs(instance, PATIENTS[0]) == 1
    assert latest_record(instance, "nodule_rois", PATIENTS[1]) is None
    assert latest_record(instance, "lidc_scan", PATIENTS[2]) is None
    started = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert [run.tags.get("dagster/partition") for run in started] == [PATIENTS[1]]


@pytest.fixture(scope="module")
def resumed(interrupted):
    root, data_dir = interrupted
    first_rois = artefact_folder(artefacts_dir(data_dir), ["nodule_rois"], PATIENTS[0])
    before = os.stat(first_rois).st_ino, os.stat(first_rois / "rois.parquet").st_mtime_ns
    lines: list[str] = []
    summary = run_pipeline(root, data_dir, progress=lines.append, training=QUICK_TRAINING, report="none")
    after = os.stat(first_rois).st_ino, os.stat(first_rois / "rois.parquet").st_mtime_ns
    return root, data_dir, summary, lines, before, after


def test_rerun_does_only_the_missing_patients(resumed) -> None:
    _, data_dir, summary, lines, before, after = resumed
    assert not summary.failed and summary.library_ok and not summary.library_skipped
    skipped = {o.patient_id for o in summary.outcomes if o.skipped}
    assert skipped == {PATIENTS[0]}
    assert any(PATIENTS[0] in line and "up to date" in line for line in lines)
    assert before == after  # the finished patient's stored ROIs were not rewritten
    instance = open_instance(data_dir)
    assert [_successful_ingest_runs(instance, p) for p in PATIENTS] == [1, 1, 1]
    dataset = load_artefact(artefact_folder(artefacts_dir(data_dir), ["roi_dataset"]))
    assert set(dataset["patient_id"]) == set(PATIENTS)


def test_the_killed_run_is_closed_not_left_running(resumed) -> None:
    _, data_dir, summary, _, _, _ = resumed
    assert summary.orphaned_runs == 1
    instance = open_instance(data_dir)
    assert not instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING]))
    (closed,) = instance.get_runs(
        RunsFilter(statuses=[DagsterRunStatus.FAILURE], tags={"dagster/partition": PATIENTS[1]})
    )
    assert RUNNER_TAG in closed.tags


def test_a_third_run_finds_everything_current(resumed) -> None:
    root, data_dir, _, _, _, _ = resumed
    instance = open_instance(data_dir)
    runs_before = len(instance.get_runs())
    lines: list[str] = []
    summary = run_pipeline(root, data_dir, progress=lines.append, training=QUICK_TRAINING, report="none")
    assert all(o.skipped for o in summary.outcomes) and len(summary.outcomes) == len(PATIENTS)
    assert summary.library_skipped and summary.library_ok
    assert summary.library_metadata["hash_index"]["items"] > 0
    assert len(open_instance(data_dir).get_runs()) == runs_before
    assert lines[-1].startswith("library: up to date")


def test_only_the_stale_end_of_the_library_is_redone(resumed, tmp_path: Path) -> None:
    """A report asked for later is the evaluation alone (no retraining); other training settings
    retrain; a lost index retrains too, so that no model that failed its checks gets indexed."""
    root, data_dir, _, _, _, _ = resumed
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    defs, instance = build_definitions(copy, root), open_instance(copy)
    library = ("roi_dataset", "hash_model", "hash_index")

    def stale(names: tuple[str, ...] = library, training: dict = QUICK_TRAINING):
        return stale_library(instance, defs, copy, names, training)

    assert stale() == ()
    assert stale((*library, "retrieval_evaluation")) == ("retrieval_evaluation",)
    assert stale(training={**QUICK_TRAINING, "epochs": 3}) == ("hash_model", "hash_index")
    shutil.rmtree(artefact_folder(artefacts_dir(copy), ["hash_index"]))
    assert stale() == ("hash_model", "hash_index")


def test_rerun_redoes_a_finished_patient(resumed) -> None:
    root, data_dir, _, _, _, _ = resumed
    lines: list[str] = []
    summary = run_pipeline(
        root,
        data_dir,
        patients=[PATIENTS[0]],
        progress=lines.append,
        training=QUICK_TRAINING,
        report="none",
        rerun=True,
    )
    (outcome,) = summary.outcomes
    assert outcome.ok and not outcome.skipped
    assert not summary.library_skipped  # new ROIs of a patient: the library follows


def test_a_training_killed_mid_way_gives_its_gpu_slot_back(tmp_path: Path) -> None:
    """A runner killed while hash_model held the gpu pool's one slot: the next run closes the
    killed run and frees the slot, instead of waiting for it for ever."""
    instance = open_instance(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    pid = int(dead.communicate()[0])
    run = instance.create_run_for_job(
        build_definitions(tmp_path, tmp_path / "lidc").resolve_job_def("retrain"),
        tags={RUNNER_TAG: owner_tag().replace(f"~{os.getpid()}~", f"~{pid}~")},
    )
    instance.handle_run_event(run.run_id, DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name))
    instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)
    assert instance.event_log_storage.claim_concurrency_slot(GPU_POOL, run.run_id, "hash_model").is_claimed
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots

    assert close_orphaned_runs(instance) == 1
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    assert not instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots
