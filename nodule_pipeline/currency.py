"""Which materializations are still current, so a rerun or a resumed backfill does only what is
missing: a patient whose source files, asset code and upstream results are unchanged is skipped.

Read from the Dagster instance (the event log is the record of what finished), checked against
the artefact folders (the record is no use if the stored result was deleted).
"""

from pathlib import Path

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    EventLogRecord,
    RunsFilter,
)
from dagster_shared.error import SerializableErrorInfo

from nodule_pipeline.resources import OPTIONAL_INPUT

CODE_VERSION_TAG = "dagster/code_version"
SOURCE_FINGERPRINT = "source_fingerprint"
"""Content hash of the patient folder ingested: how the new-scan sensor knows a delivery is not new."""


def latest_record(instance: DagsterInstance, asset_name: str, partition: str | None = None) -> EventLogRecord | None:
    """The asset's latest materialization: of one partition, or of any partition (``None``)."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset_name), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return records[0] if records else None


def metadata_of(record: EventLogRecord | None) -> dict:
    """Plain metadata values of a materialization (empty without one)."""
    if record is None or record.asset_materialization is None:
        return {}
    return {key: value.value for key, value in record.asset_materialization.metadata.items()}


def ingested_fingerprint(instance: DagsterInstance, patient_id: str) -> str | None:
    """The source fingerprint of the patient's latest ``lidc_scan``, if it was ever ingested."""
    value = metadata_of(latest_record(instance, "lidc_scan", patient_id)).get(SOURCE_FINGERPRINT)
    return str(value) if value is not None else None


def is_current(
    instance: DagsterInstance, defs: Definitions, stored: Path, asset_name: str, partition: str | None = None
) -> bool:
    """Materialized with today's code version, its ``stored`` result still on disk, and newer than
    every upstream result (of the same patient for a per-patient parent, of any patient for an
    unpartitioned child). An optional input never stored yet (no diagnosis sheet read) is no reason
    to redo the asset."""
    record = latest_record(instance, asset_name, partition)
    if record is None or not stored.exists():
        return False
    node = defs.resolve_asset_graph().get(AssetKey(asset_name))
    if node.code_version is not None and record.asset_materialization.tags.get(CODE_VERSION_TAG) != node.code_version:
        return False
    optional = optional_parents(defs, AssetKey(asset_name))
    for parent in node.parent_keys:
        upstream = latest_record(instance, parent.to_user_string(), partition)
        if upstream is None and parent in optional:
            continue
        if upstream is None or upstream.storage_id > record.storage_id:
            return False
    return True


def optional_parents(defs: Definitions, key: AssetKey) -> set[AssetKey]:
    """The upstream assets ``key`` reads as optional inputs (``OPTIONAL_INPUT`` metadata)."""
    assets_def = defs.resolve_assets_def(key)
    return {
        assets_def.keys_by_input_name[given.name]
        for given in assets_def.node_def.input_defs
        if (given.metadata or {}).get(OPTIONAL_INPUT)
    }


def innermost_message(error: SerializableErrorInfo) -> str:
    """What a user reads of a failure: the last line of its innermost cause."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip().splitlines()[-1] if error.message.strip() else error.cls_name or "error"


def latest_failure(instance: DagsterInstance, patient_id: str) -> str | None:
    """The reason the patient's latest failed run failed (None: no failed run)."""
    runs = instance.get_runs(
        RunsFilter(tags={"dagster/partition": patient_id}, statuses=[DagsterRunStatus.FAILURE]), limit=1
    )
    for run in runs:
        for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE):
            failure = entry.dagster_event.step_failure_data if entry.dagster_event else None
            if failure is not None and failure.error is not None:
                return innermost_message(failure.error)
        return "run failed"
    return None
