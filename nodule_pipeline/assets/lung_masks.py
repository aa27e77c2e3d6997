"""``lung_mask``: lung parenchyma per series, bit-packed, with its volume and a thumbnail."""

import time

import numpy as np
from dagster import AssetExecutionContext, MetadataValue, asset

from nodule_pipeline.lidc.lung_mask import label_lungs, lung_volume_ml, segment_lungs
from nodule_pipeline.lidc.series import CtSeries
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.pictures import markdown_image, mask_overlay


@asset(partitions_def=patients_partitions, group_name="ingestion", code_version="1", kinds={"numpy"})
def lung_mask(context: AssetExecutionContext, lidc_scan: list[CtSeries]) -> dict[str, np.ndarray]:
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
    context.add_output_metadata(
        {
            "lung_volume_ml": float(sum(volumes.values())),
            "lung_volume_ml_by_series": MetadataValue.json(volumes),
            "lungs_found": MetadataValue.json(lung_counts),
            "seconds": round(time.perf_counter() - started, 2),
            "thumbnail": MetadataValue.md("\n\n".join(pictures)),
        }
    )
    return masks
