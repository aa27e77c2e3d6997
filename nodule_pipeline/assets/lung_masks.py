"""``lung_mask``: lung parenchyma per series, bit-packed, with its volume and a thumbnail."""

import time

import numpy as np
from dagster import AssetCheckResult, AssetCheckSeverity, AssetExecutionContext, MetadataValue, Output, asset

from nodule_pipeline.lidc.lung_mask import (
    PLAUSIBLE_LUNG_VOLUME_ML,
    label_lungs,
    lung_volume_ml,
    lung_volume_plausible,
    segment_lungs,
)
from nodule_pipeline.lidc.series import CtSeries
from nodule_pipeline.partitions import patient_check, patients_partitions
from nodule_pipeline.pictures import markdown_image, mask_overlay

LUNG_VOLUME = "lung_volume_plausible"


@asset(
    partitions_def=patients_partitions,
    group_name="ingestion",
    code_version="1",
    kinds={"numpy"},
    check_specs=[
        patient_check(
            LUNG_VOLUME,
            "lung_mask",
            f"The lungs found in every series hold {PLAUSIBLE_LUNG_VOLUME_ML[0]:.0f} to "
            f"{PLAUSIBLE_LUNG_VOLUME_ML[1]:.0f} ml. A warning: ROIs are still cut, but the mask deserves a look.",
        )
    ],
)
def lung_mask(context: AssetExecutionContext, lidc_scan: list[CtSeries]):
    """Lung parenchyma by thresholding, morphological smoothing and largest connected components
    (the paper's ROI step), one mask per series keyed by series UID."""
    started = time.perf_counter()
    masks: dict[str, np.ndarray] = {}
    volumes, lung_counts, pictures = {}, {}, []
    for series in lidc_scan:
        mask = segment_lungs(np.asarray(series.hu), series.spacing_mm)
        masks[series.series_uid] = mask
        volumes[series.series_uid] = round(lung_volume_ml(mask, series.spacing_mm), 1)
        lung_counts[series.series_uid] = label_lungs(mask)[1]
        areas = mask.sum(axis=(0, 1))
        k = int(np.argmax(areas)) if areas.any() else mask.shape[2] // 2
        pictures.append(markdown_image(mask_overlay(series.hu[:, :, k], mask[:, :, k]), f"lung mask, slice {k}"))
    yield Output(
        masks,
        metadata={
            "lung_volume_ml": float(sum(volumes.values())),
            "lung_volume_ml_by_series": MetadataValue.json(volumes),
            "lungs_found": MetadataValue.json(lung_counts),
            "seconds": round(time.perf_counter() - started, 2),
            "thumbnail": MetadataValue.md("\n\n".join(pictures)),
        },
    )
    yield AssetCheckResult(
        check_name=LUNG_VOLUME,
        passed=all(lung_volume_plausible(v) for v in volumes.values()),
        severity=AssetCheckSeverity.WARN,
        metadata={
            "lung_volume_ml_by_series": MetadataValue.json(volumes),
            "plausible_ml": MetadataValue.json(list(PLAUSIBLE_LUNG_VOLUME_ML)),
        },
    )
