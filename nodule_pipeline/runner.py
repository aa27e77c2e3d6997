"""Materialize the chain for many patients into a persistent Dagster instance.

Used by ``nodule-pipeline run`` and ``make demo``: each patient is its own partition run, so one
patient's failure is recorded, reported and leaves every other patient's results alone. A rerun
(after an interruption, or as new scans arrive) does only what is missing: patients whose files,
code and results are unchanged are skipped, and runs a killed runner left "started" are closed.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AssetKey,
    BetaWarning,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    JobDefinition,
    PreviewWarning,
    RunsFilter,
)
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
from dagster._core.execution.api import execute_run
from dagster._core.execution.execute_in_process import merge_run_tags
from dagster._core.execution.execution_result import ExecutionResult
from dagster._core.origin import JobPythonOrigin
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

import nodule_pipeline
from nodule_pipeline import privacy
from nodule_pipeline.arrivals import Watched
from nodule_pipeline.assets.model import ACCURACY_FLOOR
from nodule_pipeline.assets.study import STUDY_FOLDER
from nodule_pipeline.currency import (
    ingested_fingerprint,
    innermost_message,
    is_current,
    latest_record,
    metadata_of,
)
from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.errors import InputDataError, check_safe_key
from nodule_pipeline.hashing.report import REPORT_JSON
from nodule_pipeline.ingest_summary import PatientIngest, summarise_ingestion
from nodule_pipeline.lidc.diagnosis import find_diagnosis_sheet, sheet_fingerprint
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.resources import default_diagnosis_sheet, remember_scan_source, scan_source_for
from nodule_pipeline.storage import artefact_folder, artefacts_dir, owner_died, owner_tag, reports_dir

PROGRESS_RUN_CONFIG = {"loggers": {"progress": {}}}
"""Runs print only the assets' own messages (epochs, warnings), not Dagster's event stream."""
LIBRARY_ASSET_NAMES = ("roi_dataset", "hash_model", "hash_index", "retrieval_evaluation")
INGESTION_ASSET_NAMES = ("lidc_scan", "lung_mask", "nodule_rois")
LIBRARY_STEPS = {
    "roi_dataset": "roi_dataset (split)",
    "hash_model": "hash_model (training)",
    "hash_index": "hash_index",
    "retrieval_evaluation": "retrieval_evaluation",
}
"""What each library step is called in the progress line."""
DIAGNOSIS_ASSET_NAMES = ("lidc_diagnosis", "nodule_diagnosis")
INSTANCE_YAML = """\
telemetry:
  enabled: false
# The gpu and index pools (nodule_pipeline/concurrency.py): one training, one index build at a time.
concurrency:
  pools:
    default_limit: 1
"""
"""The instance a new data dir gets: SQLite under ``<data-dir>/dagster``, the pools limited to one."""
RUNNER_TAG = "nodule_pipeline/runner"
"""Host and pid of the runner process that executes a run in-process (see :func:`close_orphaned_runs`)."""
CODE_LOCATION = "nodule_pipeline"
"""The code location of the Definitions, as workspace.yaml and pyproject.toml (``[tool.dagster]``,
``[tool.dg.project]``, what ``nodule-pipeline ui`` serves) name it."""
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
"""Run config of the jobs' default executor: every step in the runner's own process, one at a time."""


@dataclass
class PatientOutcome:
    patient_id: str
    ok: bool
    seconds: float
    metadata: dict = field(default_factory=dict)
    """Of ``nodule_rois``."""
    error: str | None = None
    skipped: bool = False
    """Up to date from an earlier run: nothing was executed."""
    scan: dict = field(default_factory=dict)
    """Of ``lidc_scan``: series ingested and skipped, duplicate slices resolved."""


@dataclass
class RunSummary:
    outcomes: list[PatientOutcome]
    library_ok: bool | None
    library_metadata: dict[str, dict]
    library_skipped: bool = False
    orphaned_runs: int = 0
    model_verdict: str | None = None
    """Why the trained model did or did not reach the index (the accuracy-floor check)."""
    diagnosis: str | None = None
    """What the diagnosis sheet added (or why it could not), one line; None when not attempted."""
    study: dict = field(default_factory=dict)
    """Of ``comparison_study`` (``{"failed": reason}`` when it failed); empty when not asked for."""

    @property
    def failed(self) -> list[PatientOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ingestion(self) -> dict:
        """Patients, series, duplicate slices and ROIs of this run added up (see ingest_summary)."""
        return summarise_ingestion(PatientIngest(o.patient_id, o.scan, o.metadata, o.error) for o in self.outcomes)


def instance_home(data_dir: Path) -> Path:
    """``data_dir/dagster``, the DAGSTER_HOME of the data dir, with :data:`INSTANCE_YAML` unless it
    holds an instance config already (deploy/dagster.yaml for PostgreSQL, say)."""
    home = data_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(INSTANCE_YAML)
    return home


def open_instance(data_dir: Path) -> DagsterInstance:
    """The persistent instance under ``data_dir/dagster`` (what ``make ui`` opens as DAGSTER_HOME)."""
    return DagsterInstance.from_config(str(instance_home(data_dir)))


def execute(
    job: JobDefinition,
    instance: DagsterInstance,
    run_config: Mapping[str, object],
    tags: Mapping[str, str],
    partition_key: str | None = None,
    asset_selection: Sequence[AssetKey] | None = None,
) -> ExecutionResult:
    """Execute ``job`` here, synchronously and in this process, as a run of that job in the code
    location: the run names the location, repository and job (``remote_job_origin``) and the module
    a run worker loads the job from (``job_code_origin``), as a run launched from the UI does, so
    the UI lists it on the job's page and on the Overview timeline. (``execute_in_process`` makes
    runs that name no code location: the UI attaches them to no job.) The steps run on ``job``
    itself, with the resources it was built with."""
    run_config = {**run_config, **IN_PROCESS}
    selection = set(asset_selection) if asset_selection else None
    remote_job_origin, job_code_origin = _origins(job.name)
    run = instance.create_run_for_job(
        job_def=job,
        run_config=run_config,
        tags=merge_run_tags(job, partition_key, tags, asset_selection, instance, run_config),
        asset_selection=selection,
        remote_job_origin=remote_job_origin,
        job_code_origin=job_code_origin,
    )
    return execute_run(InMemoryJob(job), run, instance)


def _origins(job_name: str) -> tuple[RemoteJobOrigin, JobPythonOrigin]:
    """The job in :data:`CODE_LOCATION` as the UI's workspace loads it (a ``python_module`` entry:
    ``nodule_pipeline.definitions`` from the folder holding the package), and where a run worker
    would load it from (``defs`` of that module)."""
    module, folder = build_definitions.__module__, str(Path(nodule_pipeline.__file__).resolve().parent.parent)
    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=module, working_directory=folder)
    repository = RemoteRepositoryOrigin(
        ManagedGrpcPythonEnvCodeLocationOrigin(target, CODE_LOCATION), SINGLETON_REPOSITORY_NAME
    )
    code = ReconstructableRepository.for_module(module, "defs", folder).get_python_origin()
    return repository.get_job_origin(job_name), code.get_job_origin(job_name)


def failure_reason(result: ExecutionResult) -> str:
    """The user-facing reason of a failed run: the innermost error of the first failed step."""
    for event in result.get_step_failure_events():
        if event.step_failure_data.error is not None:
            return innermost_message(event.step_failure_data.error)
    return "run failed"


def _materialization_metadata(result: ExecutionResult, asset_name: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == asset_name:
            return _short_values({key: value.value for key, value in materialization.metadata.items()})
    return {}


def _latest_metadata(instance: DagsterInstance, asset_name: str) -> dict:
    """The short metadata of the asset's latest materialization (a step this run did not redo)."""
    return _short_values(metadata_of(latest_record(instance, asset_name)))


def _short_values(metadata: dict) -> dict:
    """Metadata without the long entries (pictures, markdown) that a summary does not print."""
    return {key: value for key, value in metadata.items() if not isinstance(value, str) or len(value) < 500}


def _partition_key(patient: str, available: Iterable[str]) -> str:
    """A patient as the user names it (partition key, or folder name / PatientID under pseudonyms) as a key."""
    pseudonymiser = privacy.active()
    return pseudonymiser.patient(patient) if pseudonymiser and patient not in available else patient


def close_orphaned_runs(instance: DagsterInstance) -> int:
    """Mark failed the runs that a runner on this host started and did not live to finish (it was
    killed or crashed): they would otherwise show as running in the UI for ever, and the pool
    slots they held (a training killed mid-way) would keep every later training waiting."""
    closed = 0
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED])):
        if RUNNER_TAG in run.tags and owner_died(run.tags[RUNNER_TAG]):
            instance.report_run_failed(run, message="the process running it stopped (killed or crashed) mid-run")
            if instance.event_log_storage.supports_global_concurrency_limits:
                instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            closed += 1
    return closed


def patient_is_current(
    instance: DagsterInstance, defs: Definitions, data_dir: Path, patient_id: str, source: Watched
) -> bool:
    """Every per-patient asset is materialized, stored and current, from the same source files
    (``source``: the patient as the scan source holds it now)."""
    artefacts = artefacts_dir(data_dir)
    for name in INGESTION_ASSET_NAMES:
        if not is_current(instance, defs, artefact_folder(artefacts, [name], patient_id), name, patient_id):
            return False
    return ingested_fingerprint(instance, patient_id) == source.fingerprint()


def stale_library(
    instance: DagsterInstance,
    defs: Definitions,
    data_dir: Path,
    names: tuple[str, ...],
    training: dict | None,
) -> tuple[str, ...]:
    """The library assets to (re)build: from the first one that is not current, or not built with
    the training settings asked for, to the end of the chain (none: all current). A
    stale index means retraining too, so that a model that failed its checks is never indexed."""
    trained_with = metadata_of(latest_record(instance, "hash_model")).get("config") or {}
    for position, name in enumerate(names):
        settings_differ = name == "hash_model" and any(
            trained_with.get(key) != value for key, value in (training or {}).items()
        )
        if settings_differ or not is_current(instance, defs, stored_result(data_dir, name), name):
            return names[position - 1 :] if name == "hash_index" else names[position:]
    return ()


def stored_result(data_dir: Path, name: str) -> Path:
    """Where an unpartitioned asset's result lies: a report's JSON, or the artefact folder."""
    if name == "retrieval_evaluation":
        return reports_dir(data_dir) / REPORT_JSON
    if name == "comparison_study":
        return reports_dir(data_dir) / STUDY_FOLDER / REPORT_JSON
    return artefact_folder(artefacts_dir(data_dir), [name])


def run_study(
    defs: Definitions,
    instance: DagsterInstance,
    data_dir: Path,
    tags: dict[str, str],
    profile: str,
    rerun: bool,
    progress: Callable[[str], None],
) -> dict:
    """The comparison study in its own run, unless it is current (same split, model and profile):
    its metadata, or ``{"failed": reason}``."""
    current = is_current(instance, defs, stored_result(data_dir, "comparison_study"), "comparison_study")
    if not rerun and current and _latest_metadata(instance, "comparison_study").get("profile") == profile:
        progress("comparison study: up to date (same split, model and profile), skipped")
        return _latest_metadata(instance, "comparison_study")
    progress(f"comparison study ({profile}): every method retrained on the library's split")
    result = execute(
        defs.resolve_job_def("study"),
        instance,
        {**PROGRESS_RUN_CONFIG, "ops": {"comparison_study": {"config": {"profile": profile}}}},
        tags,
    )
    if not result.success:
        progress(f"comparison study: FAILED {failure_reason(result)}")
        return {"failed": failure_reason(result)}
    return _materialization_metadata(result, "comparison_study")


def run_pipeline(
    lidc_root: Path | None,
    data_dir: Path,
    patients: Iterable[str] | None = None,
    progress: Callable[[str], None] = print,
    training: dict | None = None,
    report: str = "quick",
    rerun: bool = False,
    diagnosis_sheet: Path | None = None,
    dicomweb_url: str | None = None,
    annotations_dir: Path | None = None,
) -> RunSummary:
    """Register the patients under ``lidc_root`` (or the CT studies in the PACS at
    ``dicomweb_url``, read with the LIDC XML under ``annotations_dir``) as partitions and
    materialize their chain, then
    the library: dataset split, model (``training``: hash_model config), index and, unless
    ``report`` is "none", the deployed model's evaluation; then TCIA's diagnosis sheet
    (``diagnosis_sheet``, or ``*diagnosis*.xls`` at the scan root) matched to the library's
    nodules, whose failure fails nothing else; then, unless ``report`` is "none", the comparison
    study in its own run ("quick" or "full" profile). Every patient is attempted; failures are collected
    with their reasons. What is already current is skipped unless ``rerun``, so an interrupted run
    resumes where it stopped."""
    for category in (BetaWarning, PreviewWarning):  # Dagster's API-stability notes are not for end users
        warnings.filterwarnings("ignore", category=category)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    scans = scan_source_for(data_dir, lidc_root, diagnosis_sheet, dicomweb_url, annotations_dir)
    watched = scans.watch()  # one listing of the source for the run (a PACS: one QIDO study search)
    available = sorted(watched)
    wanted = [_partition_key(p, available) for p in patients] if patients else available
    outcomes: list[PatientOutcome] = []
    runnable = []
    for patient_id in wanted:
        try:
            check_safe_key(patient_id)
            if patient_id not in available:
                what = (
                    "CT study in the PACS" if scans.is_pacs else "patient folder with DICOM files under the scan root"
                )
                raise InputDataError(f"no {what}", patient_id=patient_id, path=scans.where)
            runnable.append(patient_id)
        except InputDataError as error:
            outcomes.append(PatientOutcome(patient_id, False, 0.0, error=str(error)))
            progress(f"  {patient_id}: FAILED {error}")

    remember_scan_source(data_dir, scans, diagnosis_sheet)
    defs = build_definitions(data_dir, scan_source=scans)
    instance = open_instance(data_dir)
    orphaned = close_orphaned_runs(instance)
    if orphaned:
        progress(f"{orphaned} run(s) of an interrupted earlier run marked failed; their patients are redone")
    known = set(instance.get_dynamic_partitions(patients_partitions.name))
    instance.add_dynamic_partitions(patients_partitions.name, [p for p in runnable if p not in known])

    job = defs.resolve_job_def("ingest_patient")
    tags = {RUNNER_TAG: owner_tag()}
    for number, patient_id in enumerate(runnable, start=1):
        prefix = f"[{number:>{len(str(len(runnable)))}}/{len(runnable)}] {patient_id}"
        if not rerun and patient_is_current(instance, defs, data_dir, patient_id, watched[patient_id]):
            metadata = _short_values(metadata_of(latest_record(instance, "nodule_rois", patient_id)))
            scan = _short_values(metadata_of(latest_record(instance, "lidc_scan", patient_id)))
            outcomes.append(PatientOutcome(patient_id, True, 0.0, metadata, skipped=True, scan=scan))
            progress(f"{prefix}: up to date (same files, same code), skipped")
            continue
        started = time.perf_counter()
        result = execute(job, instance, PROGRESS_RUN_CONFIG, tags, partition_key=patient_id)
        seconds = time.perf_counter() - started
        if result.success:
            metadata = _materialization_metadata(result, "nodule_rois")
            scan = _materialization_metadata(result, "lidc_scan")
            outcomes.append(PatientOutcome(patient_id, True, seconds, metadata, scan=scan))
            kept, benign, malignant = (metadata.get(key, 0) for key in ("kept", "benign", "malignant"))
            dropped = metadata.get("dropped_indeterminate", 0)
            notes = "".join(
                f", {n} {what}"
                for what, n in (
                    ("series skipped (not CT)", scan.get("skipped_series", 0)),
                    ("duplicate slices resolved", scan.get("duplicate_slices_resolved", 0)),
                )
                if n
            )
            progress(
                f"{prefix}: ok  {kept} ROIs ({benign} benign, {malignant} malignant, {dropped} rated 3 dropped{notes})"
                f" {seconds:.1f} s"
            )
        else:
            reason = failure_reason(result)
            outcomes.append(PatientOutcome(patient_id, False, seconds, error=reason))
            progress(f"{prefix}: FAILED {reason}")

    summary = RunSummary(outcomes, None, {}, orphaned_runs=orphaned)
    if not (any(o.ok for o in outcomes) or instance.get_dynamic_partitions(patients_partitions.name)):
        return summary
    names = LIBRARY_ASSET_NAMES if report != "none" else LIBRARY_ASSET_NAMES[:-1]
    sheet_failure = None  # the sheet is read before the library: the evaluation scores against it
    if rerun or not diagnosis_is_current(
        instance, defs, data_dir, scans.sheet_folder, diagnosis_sheet, ("lidc_diagnosis",)
    ):
        sheet = run_diagnosis(defs, instance, tags, ("lidc_diagnosis",))
        sheet_failure = None if sheet.success else diagnosis_failure(sheet)
    stale = names if rerun else stale_library(instance, defs, data_dir, names, training)
    summary.library_ok, summary.library_skipped = True, not stale
    summary.library_metadata = {name: _latest_metadata(instance, name) for name in LIBRARY_ASSET_NAMES}
    if not stale:
        progress("library: up to date (no new ROIs, same code and settings), skipped")
    else:
        progress(f"library: {', '.join(LIBRARY_STEPS[name] for name in stale)}")
        ops = {"hash_model": {"config": training or {}}} if "hash_model" in stale else {}
        result = execute(
            defs.resolve_job_def("build_library"),
            instance,
            {**PROGRESS_RUN_CONFIG, "ops": ops},
            tags,
            asset_selection=[AssetKey(name) for name in stale],
        )
        summary.library_ok = result.success
        summary.model_verdict = next(
            (e.description for e in result.get_asset_check_evaluations() if e.check_name == ACCURACY_FLOOR), None
        )
        summary.library_metadata |= {name: _materialization_metadata(result, name) for name in stale}
        if not result.success:
            progress(f"library: FAILED {failure_reason(result)}")
    if sheet_failure is not None:
        summary.diagnosis = sheet_failure
    elif not diagnosis_is_current(instance, defs, data_dir, scans.sheet_folder, diagnosis_sheet):
        summary.diagnosis = attach_diagnosis(defs, instance, tags, ("nodule_diagnosis",))
    if summary.diagnosis:
        progress(f"diagnosis: {summary.diagnosis}")
    if report != "none" and summary.library_ok:
        summary.study = run_study(defs, instance, data_dir, tags, report, rerun, progress)
    return summary


def diagnosis_is_current(
    instance: DagsterInstance,
    defs: Definitions,
    data_dir: Path,
    sheet_folder: Path,
    given: Path | None,
    names: tuple[str, ...] = DIAGNOSIS_ASSET_NAMES,
) -> bool:
    """The diagnosis assets (``names``) are current: today's code, newer than roi_dataset, from the same sheet."""
    for name in names:
        if not is_current(instance, defs, artefact_folder(artefacts_dir(data_dir), [name]), name):
            return False
    try:
        sheet = find_diagnosis_sheet(sheet_folder, given or default_diagnosis_sheet(data_dir) or None)
        fingerprint = sheet_fingerprint(sheet)
    except (InputDataError, OSError):
        return False  # its run says why
    return metadata_of(latest_record(instance, "lidc_diagnosis")).get("sheet_fingerprint") == fingerprint


def run_diagnosis(
    defs: Definitions, instance: DagsterInstance, tags: dict[str, str], names: tuple[str, ...] = DIAGNOSIS_ASSET_NAMES
) -> ExecutionResult:
    """Materialize the diagnosis assets ``names`` in their own run: a bad sheet fails only this."""
    return execute(
        defs.resolve_job_def("attach_diagnosis"),
        instance,
        PROGRESS_RUN_CONFIG,
        tags,
        asset_selection=[AssetKey(name) for name in names],
    )


def diagnosis_failure(result: ExecutionResult) -> str:
    return f"FAILED {failure_reason(result)} (the library and its search are not affected)"


def attach_diagnosis(
    defs: Definitions, instance: DagsterInstance, tags: dict[str, str], names: tuple[str, ...] = DIAGNOSIS_ASSET_NAMES
) -> str:
    """Read the diagnosis sheet and match it to the library's nodules (``names``: the steps to run;
    the others' latest results count), and say in one line what it gave."""
    result = run_diagnosis(defs, instance, tags, names)
    if not result.success:
        return diagnosis_failure(result)
    sheet, matched = (
        _materialization_metadata(result, name) if name in names else _latest_metadata(instance, name)
        for name in DIAGNOSIS_ASSET_NAMES
    )
    if sheet.get("source") == "none":
        return "no diagnosis sheet (*diagnosis*.xls at the scan root, or run --diagnosis FILE): none shown"
    return (
        f"{sheet.get('source')}: {sheet.get('patients')} patients; {matched.get('nodules_matched')} of "
        f"{matched.get('nodules')} library nodules matched ({matched.get('patients_matched')} patients)"
    )
