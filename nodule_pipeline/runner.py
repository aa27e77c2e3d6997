"""Materialize the chain for many patients into a persistent Dagster instance.

Used by ``nodule-pipeline run`` and ``make demo``: each patient is its own partition run, so one
patient's failure is recorded, reported and leaves every other patient's results alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetKey, BetaWarning, DagsterInstance, ExecuteInProcessResult, PreviewWarning

from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.errors import InputDataError, check_safe_key
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.resources import ScanSource, remember_lidc_root

PROGRESS_RUN_CONFIG = {"loggers": {"progress": {}}}
"""Runs print only the assets' own messages (epochs, warnings), not Dagster's event stream."""
LIBRARY_ASSET_NAMES = ("roi_dataset", "hash_model", "hash_index", "retrieval_evaluation")
INSTANCE_YAML = "telemetry:\n  enabled: false\n"


@dataclass
class PatientOutcome:
    patient_id: str
    ok: bool
    seconds: float
    metadata: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunSummary:
    outcomes: list[PatientOutcome]
    library_ok: bool | None
    library_metadata: dict[str, dict]

    @property
    def failed(self) -> list[PatientOutcome]:
        return [o for o in self.outcomes if not o.ok]


def open_instance(data_dir: Path) -> DagsterInstance:
    """The persistent instance under ``data_dir/dagster`` (what ``make ui`` opens as DAGSTER_HOME)."""
    home = data_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(INSTANCE_YAML)
    return DagsterInstance.from_config(str(home))


def failure_reason(result: ExecuteInProcessResult) -> str:
    """The user-facing reason of a failed run: the innermost error of the first failed step."""
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            return error.message.strip().splitlines()[-1] if error.message.strip() else error.cls_name or "error"
    return "run failed"


def _materialization_metadata(result: ExecuteInProcessResult, asset_name: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == asset_name:
            return {
                key: value.value
                for key, value in materialization.metadata.items()
                if not isinstance(value.value, str) or len(value.value) < 500
            }
    return {}


def run_pipeline(
    lidc_root: Path,
    data_dir: Path,
    patients: Iterable[str] | None = None,
    progress: Callable[[str], None] = print,
    training: dict | None = None,
    report: str = "quick",
) -> RunSummary:
    """Register the patients under ``lidc_root`` as partitions and materialize their chain, then
    the library: dataset split, model (``training``: hash_model config), index and, unless
    ``report`` is "none", the evaluation report ("quick" or "full" profile).
    Every patient is attempted; failures are collected with their reasons."""
    for category in (BetaWarning, PreviewWarning):  # Dagster's API-stability notes are not for end users
        warnings.filterwarnings("ignore", category=category)
    lidc_root, data_dir = lidc_root.resolve(), data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    found = ScanSource(root=str(lidc_root)).list_patients()
    wanted = list(patients) if patients else found
    outcomes: list[PatientOutcome] = []
    runnable = []
    for patient_id in wanted:
        try:
            check_safe_key(patient_id)
            if patient_id not in found:
                raise InputDataError(
                    "no patient folder with DICOM files under the scan root", patient_id=patient_id, path=lidc_root
                )
            runnable.append(patient_id)
        except InputDataError as error:
            outcomes.append(PatientOutcome(patient_id, False, 0.0, error=str(error)))
            progress(f"  {patient_id}: FAILED {error}")

    remember_lidc_root(data_dir, lidc_root)
    defs = build_definitions(data_dir, lidc_root)
    instance = open_instance(data_dir)
    known = set(instance.get_dynamic_partitions(patients_partitions.name))
    instance.add_dynamic_partitions(patients_partitions.name, [p for p in runnable if p not in known])

    job = defs.resolve_job_def("ingest_patient")
    for number, patient_id in enumerate(runnable, start=1):
        started = time.perf_counter()
        result = job.execute_in_process(
            run_config=PROGRESS_RUN_CONFIG, instance=instance, partition_key=patient_id, raise_on_error=False
        )
        seconds = time.perf_counter() - started
        prefix = f"[{number:>{len(str(len(runnable)))}}/{len(runnable)}] {patient_id}"
        if result.success:
            metadata = _materialization_metadata(result, "nodule_rois")
            outcomes.append(PatientOutcome(patient_id, True, seconds, metadata))
            kept, benign, malignant = (metadata.get(key, 0) for key in ("kept", "benign", "malignant"))
            dropped = metadata.get("dropped_indeterminate", 0)
            progress(
                f"{prefix}: ok  {kept} ROIs ({benign} benign, {malignant} malignant, {dropped} rated 3 dropped)"
                f" {seconds:.1f} s"
            )
        else:
            reason = failure_reason(result)
            outcomes.append(PatientOutcome(patient_id, False, seconds, error=reason))
            progress(f"{prefix}: FAILED {reason}")

    library_ok, library_metadata = None, {}
    if any(o.ok for o in outcomes) or instance.get_dynamic_partitions(patients_partitions.name):
        progress("library: roi_dataset (split), hash_model (training), hash_index, retrieval_evaluation")
        ops = {"hash_model": {"config": training or {}}}
        selection = [AssetKey(name) for name in LIBRARY_ASSET_NAMES]
        if report == "none":
            selection = selection[:-1]
        else:
            ops["retrieval_evaluation"] = {"config": {"profile": report}}
        result = defs.resolve_job_def("build_library").execute_in_process(
            run_config={**PROGRESS_RUN_CONFIG, "ops": ops},
            instance=instance,
            raise_on_error=False,
            asset_selection=selection,
        )
        library_ok = result.success
        library_metadata = {name: _materialization_metadata(result, name) for name in LIBRARY_ASSET_NAMES}
        if not result.success:
            progress(f"library: FAILED {failure_reason(result)}")
    return RunSummary(outcomes, library_ok, library_metadata)
