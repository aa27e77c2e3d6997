"""``lidc_scan``: a patient's CT series found, validated and loaded as HU volumes."""

import time
from collections import Counter

from dagster import AssetCheckResult, AssetCheckSeverity, AssetExecutionContext, MetadataValue, Output, asset

from nodule_pipeline import privacy
from nodule_pipeline.currency import SOURCE_FINGERPRINT
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
    """Every CT series of the patient (TCIA layouts, or fetched from a PACS over DICOMweb) with its
    LIDC XML annotations, validated:
    readable slices, one series per folder, no missing slices, annotations on slices of the
    series. Other series (radiographs, SEG, SR) are skipped and listed; slices sharing a z keep
    the lower InstanceNumber, as in pylidc, and are listed too. Stored as zstd-compressed int16
    volumes plus JSON; only technical DICOM attributes are read, and UIDs, readers and paths are
    pseudonymised when pseudonyms are on."""
    patient_id = context.partition_key
    started = time.perf_counter()
    local = scan_source.fetch_patient(patient_id)
    found = find_series_folders(local.folder, patient_id)
    skipped_series = local.remote_skipped + found.skipped
    for skipped in skipped_series:
        where = privacy.shown_path(skipped.folder)
        context.log.info(f"{patient_id}: skipped a {skipped.modality} series ({skipped.files} files), not CT: {where}")
    if scan_source.is_pacs:
        context.log.info(f"{patient_id}: {len(found.ct_folders)} CT series from {local.source}")
    series_list = [load_series(folder, patient_id) for folder in found.ct_folders]
    duplicates = [d for s in series_list for d in s.duplicate_slices]
    for duplicate in duplicates:
        context.log.warning(f"{patient_id}: {duplicate.describe()}")
    ignored_xml = [privacy.shown_path(path) for s in series_list for path in s.annotations.ignored_files]
    for path in ignored_xml:
        context.log.info(f"{patient_id}: {path} is a radiograph reading (IdriReadMessage), not a CT read: ignored")
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
            "skipped_series": len(skipped_series),
            "skipped_by_modality": MetadataValue.json(dict(Counter(s.modality for s in skipped_series))),
            "skipped_series_list": MetadataValue.json([s.to_dict() for s in skipped_series]),
            "duplicate_slices_resolved": len(duplicates),
            "duplicate_slices": MetadataValue.json([d.to_dict() for d in duplicates]),
            "ignored_reading_files": MetadataValue.json(ignored_xml),
            "volume_mb": round(sum(s.hu.nbytes for s in series_list) / 2**20, 1),
            "source": MetadataValue.text(local.source) if scan_source.is_pacs else MetadataValue.path(local.source),
            SOURCE_FINGERPRINT: local.fingerprint,
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
