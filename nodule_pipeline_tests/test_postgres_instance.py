"""The production instance config (deploy/dagster.yaml) on a real PostgreSQL 15 server.

One pipeline run on two small generated patients goes through ``run_pipeline`` exactly as
``nodule-pipeline run`` does, with deploy/dagster.yaml as the instance: runs, event logs and dynamic
partitions must land in PostgreSQL and nothing in SQLite; a submitted run must wait in the queue.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from dagster import DagsterInstance, DagsterRunStatus, QueuedRunCoordinator
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._utils.tags import TagConcurrencyLimitsCounter

from nodule_pipeline.concurrency import STAGE_TAG
from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.runner import RunSummary, open_instance, run_pipeline
from nodule_pipeline_tests.conftest import QUICK_TRAINING
from nodule_pipeline_tests.postgres import PostgresServer

DEPLOY_INSTANCE_YAML = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"
PATIENTS = ("LIDC-IDRI-0957", "LIDC-IDRI-0078")  # 65 and 87 slices: small and quick


@dataclass
class PostgresRun:
    root: Path
    data_dir: Path
    server: PostgresServer
    summary: RunSummary


def pg_rows(server: PostgresServer, sql: str) -> list[tuple]:
    with psycopg2.connect(server.url) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        rows = cursor.fetchall()
    connection.close()
    return rows


@pytest.fixture(scope="module")
def pg_run(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory, one_torch_thread
) -> Iterator[PostgresRun]:
    """deploy/dagster.yaml as the instance of a fresh data dir, pointed at the test server by the
    DAGSTER_PG_* variables (kept set for the module: the instance reads them when it loads)."""
    root = tmp_path_factory.mktemp("lidc")
    for patient_id in PATIENTS:
        generate_patient(patient_id, root, seed=0)
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "dagster").mkdir()
    shutil.copyfile(DEPLOY_INSTANCE_YAML, data_dir / "dagster" / "dagster.yaml")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DAGSTER_PG_HOST", postgres_server.host)
        env.setenv("DAGSTER_PG_PORT", str(postgres_server.port))
        env.setenv("DAGSTER_PG_USER", postgres_server.user)
        env.setenv("DAGSTER_PG_PASSWORD", postgres_server.password)
        env.setenv("DAGSTER_PG_DB", postgres_server.db)
        summary = run_pipeline(root, data_dir, progress=lambda _: None, training=QUICK_TRAINING, report="none")
        yield PostgresRun(root, data_dir, postgres_server, summary)


def test_pipeline_runs_with_postgres_storage(pg_run: PostgresRun) -> None:
    summary = pg_run.summary
    assert sorted(o.patient_id for o in summary.outcomes) == sorted(PATIENTS)
    assert not summary.failed, [(o.patient_id, o.error) for o in summary.failed]
    assert summary.library_ok


def test_runs_events_and_partitions_are_in_postgres(pg_run: PostgresRun) -> None:
    server = pg_run.server
    runs = dict(pg_rows(server, "SELECT pipeline_name, count(*) FROM runs GROUP BY pipeline_name"))
    assert runs.get("ingest_patient") == len(PATIENTS)
    assert runs.get("build_library") == 1
    materialized = set(
        pg_rows(
            server,
            "SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'",
        )
    )
    for patient_id in PATIENTS:
        for asset in ("lidc_scan", "lung_mask", "nodule_rois"):
            assert (f'["{asset}"]', patient_id) in materialized
    for asset in ("roi_dataset", "hash_model", "hash_index"):
        assert (f'["{asset}"]', None) in materialized
    partitions = pg_rows(server, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'patients'")
    assert sorted(p for (p,) in partitions) == sorted(PATIENTS)

    instance = open_instance(pg_run.data_dir)  # the same yaml, read back through Dagster
    assert sorted(instance.get_dynamic_partitions("patients")) == sorted(PATIENTS)
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"


def test_no_sqlite_storage_is_created(pg_run: PostgresRun) -> None:
    home = pg_run.data_dir / "dagster"
    assert (home / "dagster.yaml").is_file()
    assert not sorted(home.rglob("*.db")), "SQLite storage created beside the PostgreSQL one"


def test_queued_run_coordinator_with_stage_limits(pg_run: PostgresRun) -> None:
    instance = open_instance(pg_run.data_dir)
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    queue = instance.get_concurrency_config().run_queue_config  # what the daemon dequeues under
    assert queue is not None
    assert queue.max_concurrent_runs >= 4
    limits = {(limit["key"], limit.get("value")): limit["limit"] for limit in queue.tag_concurrency_limits}
    assert limits == {
        (STAGE_TAG, "ingest"): 4,
        (STAGE_TAG, "train"): 1,
        (STAGE_TAG, "index"): 1,
        (STAGE_TAG, "study"): 1,
    }

    # The limits mean what they say: with 4 ingest runs in progress a 5th waits, a train run does not;
    # with 1 train run in progress a 2nd waits.
    def run(stage: str) -> DagsterRun:
        return DagsterRun(job_name=f"{stage}-job", tags={STAGE_TAG: stage})

    ingesting = TagConcurrencyLimitsCounter(queue.tag_concurrency_limits, [run("ingest")] * 4)
    assert ingesting.is_blocked(run("ingest"))
    assert not ingesting.is_blocked(run("train"))
    assert not TagConcurrencyLimitsCounter(queue.tag_concurrency_limits, [run("ingest")] * 3).is_blocked(run("ingest"))
    training = TagConcurrencyLimitsCounter(queue.tag_concurrency_limits, [run("train")])
    assert training.is_blocked(run("train"))
    assert not training.is_blocked(run("ingest"))
    # a long comparison study never holds a retrain in the queue, nor a retrain the study
    assert not TagConcurrencyLimitsCounter(queue.tag_concurrency_limits, [run("study")]).is_blocked(run("train"))
    assert not training.is_blocked(run("study"))


def test_submitted_run_waits_in_the_queue(pg_run: PostgresRun, tmp_path: Path) -> None:
    """A run submitted as the webserver submits it (instance.submit_run with a workspace) is QUEUED
    in PostgreSQL and stays there: no daemon runs here to dequeue it."""
    code = tmp_path / "code_location.py"
    code.write_text(
        "from pathlib import Path\n"
        "from nodule_pipeline.definitions import build_definitions\n"
        f"defs = build_definitions(Path({str(pg_run.data_dir)!r}), Path({str(pg_run.root)!r}))\n"
    )
    instance = open_instance(pg_run.data_dir)
    origin = LoadableTargetOrigin(python_file=str(code), working_directory=str(tmp_path))
    with in_process_test_workspace(instance, origin) as workspace:
        (entry,) = workspace.get_code_location_entries().values()
        location = entry.code_location
        assert location is not None, entry.load_error
        (repository,) = location.get_repositories().values()
        job = repository.get_full_job("ingest_patient")
        plan = location.get_execution_plan(job, {}, step_keys_to_execute=None, known_state=None, instance=instance)
        created = instance.create_run(
            job_name=job.name,
            run_id=None,
            run_config={},
            resolved_op_selection=None,
            step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
            op_selection=None,
            status=None,
            root_run_id=None,
            parent_run_id=None,
            tags={**job.tags, "dagster/partition": PATIENTS[0]},
            job_snapshot=job.job_snapshot,
            execution_plan_snapshot=plan.execution_plan_snapshot,
            parent_job_snapshot=job.parent_job_snapshot,
            remote_job_origin=job.get_remote_origin(),
            job_code_origin=job.get_python_origin(),
            asset_selection=None,
            asset_check_selection=None,
            asset_graph=repository.asset_graph,
        )
        submitted = instance.submit_run(created.run_id, workspace)
    assert submitted.status == DagsterRunStatus.QUEUED
    stored = DagsterInstance.from_config(str(pg_run.data_dir / "dagster")).get_run_by_id(created.run_id)
    assert stored is not None and stored.status == DagsterRunStatus.QUEUED
    assert stored.tags[STAGE_TAG] == "ingest"  # the job's stage tag travels with the run: the queue limits apply
    (status,) = pg_rows(pg_run.server, f"SELECT status FROM runs WHERE run_id = '{created.run_id}'")[0]
    assert status == "QUEUED"
