"""What runs by itself: the new-scan sensor, the library refresh and the weekly retrain.

- ``new_scans`` watches the scan source (the scan root, or a PACS's studies over QIDO-RS); a
  complete new (or changed) patient becomes a ``patients`` partition and an ``ingest_patient``
  run, keyed by its content fingerprint so a second delivery of the same files is a no-op.
- ``library_refresh`` evaluates the automation conditions of ``roi_dataset`` and ``hash_index``
  (see ``assets/refresh.py``): new ROIs are split (new patients to the database side) and
  encoded with the current model, no retraining; ``nodule_diagnosis`` matches the new nodules
  to the diagnosis sheet.
- ``evaluation_after_retrain`` re-runs ``retrieval_evaluation`` after a new model passed its checks.
- ``weekly_retrain`` retrains ``hash_model`` (cron from ``NODULE_PIPELINE_RETRAIN_CRON``).
- ``monthly_study`` re-runs the comparison study (cron from ``NODULE_PIPELINE_STUDY_CRON``);
  stopped until a user starts it: the study answers a research question, not a clinical one.
"""

import json
import os

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from nodule_pipeline.arrivals import ArrivalState, find_arrivals
from nodule_pipeline.concurrency import INDEX, INGEST, STUDY, TRAIN
from nodule_pipeline.currency import ingested_fingerprint
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.jobs import comparison_study_job, ingest_patient_job, retrain_job
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.resources import ScanSource

SETTLE_SECONDS_ENV = "NODULE_PIPELINE_SETTLE_SECONDS"
RETRAIN_CRON_ENV = "NODULE_PIPELINE_RETRAIN_CRON"
STUDY_CRON_ENV = "NODULE_PIPELINE_STUDY_CRON"
DEFAULT_SETTLE_SECONDS = 60.0
DEFAULT_RETRAIN_CRON = "0 3 * * 0"  # Sundays 03:00
DEFAULT_STUDY_CRON = "0 3 1 * *"  # the first of the month, 03:00


def settle_seconds() -> float:
    """How long a patient (a folder without a ``.complete`` marker, a PACS patient's studies and
    their instance counts) must stay unchanged to count as complete."""
    return float(os.environ.get(SETTLE_SECONDS_ENV, DEFAULT_SETTLE_SECONDS))


@sensor(
    job=ingest_patient_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="New or changed complete patients of the scan source (folders under the scan root, or "
    "studies in a PACS) become partitions and ingestion runs.",
)
def new_scans(context: SensorEvaluationContext, scan_source: ScanSource):
    state = ArrivalState.from_dict(json.loads(context.cursor) if context.cursor else None)
    try:  # a PACS that is down or answers an error: skip with the reason, look again next time
        watched = scan_source.watch()
        arrivals = find_arrivals(watched, state, settle_seconds(), lambda p: ingested_fingerprint(context.instance, p))
    except InputDataError as error:
        return SkipReason(str(error))
    known = set(context.instance.get_dynamic_partitions(patients_partitions.name))
    new = sorted({a.patient_id for a in arrivals} - known)
    if arrivals:
        context.log.info(f"{len(arrivals)} patient(s) to ingest ({len(new)} new): {[a.patient_id for a in arrivals]}")
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"{a.patient_id}:{a.fingerprint}", partition_key=a.patient_id, tags=INGEST)
            for a in arrivals
        ],
        dynamic_partitions_requests=[patients_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(state.to_dict()),
        skip_reason=None if arrivals else f"nothing new; {len(state.pending)} patient(s) settling",
    )


library_refresh = AutomationConditionSensorDefinition(
    "library_refresh",
    target=AssetSelection.assets("roi_dataset", "hash_index", "nodule_diagnosis"),
    run_tags=INDEX,
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="roi_dataset, hash_index and nodule_diagnosis follow new patients' ROIs (no retraining).",
)
evaluation_after_retrain = AutomationConditionSensorDefinition(
    "evaluation_after_retrain",
    target=AssetSelection.assets("retrieval_evaluation"),
    run_tags=TRAIN,
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="retrieval_evaluation re-runs after hash_model is retrained and passes its checks.",
)
weekly_retrain = ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_job,
    cron_schedule=os.environ.get(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON),
    tags=TRAIN,
    default_status=DefaultScheduleStatus.RUNNING,
    description="Retrain hash_model on everything ingested so far, then re-encode the index and evaluate.",
)
monthly_study = ScheduleDefinition(
    name="monthly_study",
    job=comparison_study_job,
    cron_schedule=os.environ.get(STUDY_CRON_ENV, DEFAULT_STUDY_CRON),
    tags=STUDY,
    default_status=DefaultScheduleStatus.STOPPED,
    description="Re-run the comparison study (every method retrained) on the current split and recipe.",
)
SENSORS = [new_scans, library_refresh, evaluation_after_retrain]
SCHEDULES = [weekly_retrain, monthly_study]
