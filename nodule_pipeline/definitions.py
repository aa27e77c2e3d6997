"""The one Definitions object: assets, checks, jobs, sensors, schedules and resources."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dagster import Definitions, InitLoggerContext, logger

from nodule_pipeline.assets import ALL_ASSETS, ALL_CHECKS
from nodule_pipeline.automation import SCHEDULES, SENSORS
from nodule_pipeline.jobs import ALL_JOBS
from nodule_pipeline.resources import (
    ArtefactIOManager,
    ReportStore,
    ScanSource,
    default_data_dir,
    scan_source_for,
)
from nodule_pipeline.storage import artefacts_dir, reports_dir


class _StepMessages(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        meta = record.__dict__.get("dagster_meta", {})
        if meta.get("dagster_event") is None:  # what the assets themselves say, not Dagster's own events
            print(
                f"  {meta.get('step_key') or 'run'}: {meta.get('orig_message', record.getMessage())}",
                file=sys.stdout,
                flush=True,
            )


@logger(description="Terse progress for the command line: only the assets' own messages (INFO and up).")
def progress_logger(init_context: InitLoggerContext) -> logging.Logger:
    progress = logging.getLogger("nodule_pipeline.progress")
    progress.setLevel(logging.INFO)
    progress.handlers = [_StepMessages()]
    progress.propagate = False
    return progress


def build_definitions(
    data_dir: Path | None = None,
    lidc_root: Path | None = None,
    diagnosis_sheet: Path | None = None,
    scan_source: ScanSource | None = None,
) -> Definitions:
    """Definitions for one data folder (artefacts under ``data_dir/artefacts``) and scan source
    (``scan_source``, else the scan root ``lidc_root`` or what the data dir recorded)."""
    data_dir = (data_dir or default_data_dir()).resolve()
    return Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=ALL_JOBS,
        sensors=SENSORS,
        schedules=SCHEDULES,
        loggers={"progress": progress_logger},
        resources={
            "scan_source": scan_source or scan_source_for(data_dir, lidc_root, diagnosis_sheet),
            "io_manager": ArtefactIOManager(base_dir=str(artefacts_dir(data_dir))),
            "reports": ReportStore(folder=str(reports_dir(data_dir))),
        },
    )


defs = build_definitions()
