"""The one Definitions object: assets, checks, jobs and resources of nodule_pipeline."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetSelection, Definitions, define_asset_job

from nodule_pipeline.assets import ALL_ASSETS, INGESTION_ASSETS
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.resources import (
    ArtefactIOManager,
    ScanSource,
    artefacts_dir,
    default_data_dir,
    default_lidc_root,
)

ingest_patient_job = define_asset_job(
    "ingest_patient",
    selection=AssetSelection.assets(*INGESTION_ASSETS),
    partitions_def=patients_partitions,
    description="Scan to lung mask to ROIs for one patient partition.",
)
build_dataset_job = define_asset_job(
    "build_dataset", selection=AssetSelection.assets("roi_dataset"), description="Union of all patients' ROIs, split."
)


def build_definitions(data_dir: Path | None = None, lidc_root: Path | None = None) -> Definitions:
    """Definitions for one data folder (artefacts under ``data_dir/artefacts``) and scan root."""
    data_dir = (data_dir or default_data_dir()).resolve()
    lidc_root = (lidc_root or default_lidc_root(data_dir)).resolve()
    return Definitions(
        assets=ALL_ASSETS,
        jobs=[ingest_patient_job, build_dataset_job],
        resources={
            "scan_source": ScanSource(root=str(lidc_root)),
            "io_manager": ArtefactIOManager(base_dir=str(artefacts_dir(data_dir))),
        },
    )


defs = build_definitions()
