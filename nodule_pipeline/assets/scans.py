"""``lidc_scan``: a patient's CT series found, validated and loaded as HU volumes."""

import time

from dagster import AssetCheckResult, AssetCheckSeverity, AssetExecutionContext, MetadataValue, Output, asset

from nodule_pipeline import privacy
from nodule_pipeline.arrivals import content_fingerprint
from nodule_pipeline.lidc.series import (
    AIR_HU_MAX,
    DENSE_HU_RANGE,
    LOWEST_STORED_HU,
    find_series_folders,
    hu_range,
    load_series,
)
from nodule_pipeline.partitions import patient_check, patients_partitions
from nodule_pipeline.pictures import markdown_image, mask_overlay
from nodule_pipeline.resources import ScanSource

SOURCE_FINGERPRINT = "source_fingerprint"
"""Content hash of the patient folder ingested: how the new-scan sensor knows a delivery is not new."""
HU_RANGE = "hu_range_plausible"


@asset(
    partitions_def=patients_partitions,
    group_name="ingestion",
    code_version="2",
    kinds={"dicom", "numpy"},
    check_specs=[
        patient_check(
            HU_RANGE,
            "lidc_scan",
            f"Every series reads as Hounsfield units of a chest CT: nothing below {LOWEST_STORED_HU}, its darkest "
            f"percent air (<= {AIR_HU_MAX}), its brightest percent within {DENSE_HU_RANGE}. Blocking: no lung "
            "mask or ROIs are cut from a volume that is not in HU.",
            blocking=True,
        )
    ],
)
def lidc_scan(context: AssetExecutionContext, scan_source: ScanSource):
    """Every CT series of the patient (TCIA layout) with its LIDC XML annotations, validated:
    readable slices, one series per folder, no missing or duplicate slices, annotations on
    slices of the series. Stored as zstd-compressed int16 volumes plus JSON; only technical DICOM
    attributes are read, and UIDs, readers and paths are pseudonymised when pseudonyms are on."""
    patient_id = context.partition_key
    started = time.perf_counter()
    patient_dir = scan_source.patient_dir(patient_id)  # under pseudonyms a look through the scan root: once
    series_list = [load_series(folder, patient_id) for folder in find_series_folders(patient_dir, patient_id)]
    pseudonymiser = privacy.active()
    if pseudonymiser:
        series_list = [series.pseudonymised(pseudonymiser) for series in series_list]
    middle = series_list[0].hu[:, :, series_list[0].hu.shape[2] // 2]
    ranges = {s.series_uid: hu_range(s.hu) for s in series_list}
    yield Output(
        series_list,
        metadata={
            "series": len(series_list),
            "slices": sum(s.shape[2] for s in series_list),
            "shape": MetadataValue.json({s.series_uid: list(s.shape) for s in series_list}),
            "spacing_mm": MetadataValue.json({s.series_uid: list(s.spacing_mm) for s in series_list}),
            "annotations": sum(len(s.annotations.annotations) for s in series_list),
            "annotation_files": MetadataValue.json([str(s.annotations.xml_path) for s in series_list]),
            "volume_mb": round(sum(s.hu.nbytes for s in series_list) / 2**20, 1),
            "source": MetadataValue.path(privacy.shown_path(patient_dir)),
            SOURCE_FINGERPRINT: content_fingerprint(patient_dir),
            "seconds": round(time.perf_counter() - started, 2),
            "middle_slice": MetadataValue.md(markdown_image(mask_overlay(middle, middle < -10000), "middle slice")),
        },
    )
    yield AssetCheckResult(
        check_name=HU_RANGE,
        passed=all(r.plausible for r in ranges.values()),
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "lowest_hu": min(r.lowest for r in ranges.values()),
            "highest_hu": max(r.highest for r in ranges.values()),
            "by_series": MetadataValue.json({uid: {**vars(r), "plausible": r.plausible} for uid, r in ranges.items()}),
        },
    )
