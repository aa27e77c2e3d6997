"""``nodule_rois``: one 32x32 ROI per reader annotation with malignancy != 3."""

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from nodule_pipeline.lidc.rois import RoiSettings, account_for_annotations, centres_outside, extract_rois
from nodule_pipeline.lidc.series import CtSeries
from nodule_pipeline.partitions import patient_check, patients_partitions
from nodule_pipeline.pictures import markdown_image, roi_montage
from nodule_pipeline.resources import LAZY_VOLUMES
from nodule_pipeline.roi_table import empty_roi_table, roi_images, table_fingerprint, validate_roi_table

ROIS_ACCOUNT_FOR_ANNOTATIONS = "rois_account_for_rated_annotations"
CENTRES_IN_LUNG_OR_OUTLINE = "roi_centres_in_lung_or_outline"


class RoiConfig(Config):
    """``mask_outside_lung``: keep only lung parenchyma (and the nodule) in the ROI, as the paper."""

    mask_outside_lung: bool = True


@asset(
    partitions_def=patients_partitions,
    group_name="ingestion",
    code_version="2",  # 2: the crop no longer reads the reader's outline (one cut with queries)
    kinds={"parquet"},
    # ROIs need the rows around each nodule's centre only: the stored scan is read lazily.
    ins={"lidc_scan": AssetIn(metadata={LAZY_VOLUMES: True}), "lung_mask": AssetIn()},
    check_specs=[
        patient_check(
            ROIS_ACCOUNT_FOR_ANNOTATIONS,
            "nodule_rois",
            "ROIs kept + rating-3 annotations dropped = the rated annotations of the scan's XML, one ROI per "
            "annotation rated 1, 2, 4 or 5.",
        ),
        patient_check(
            CENTRES_IN_LUNG_OR_OUTLINE,
            "nodule_rois",
            "Every ROI's centre voxel lies in the lung mask or in its reader's nodule outline on that slice.",
        ),
    ],
)
def nodule_rois(
    context: AssetExecutionContext, config: RoiConfig, lidc_scan: list[CtSeries], lung_mask: dict[str, np.ndarray]
):
    """ROI rows in the ROI-table contract: image, annotation and nodule labels, the nine
    characteristics, diameter and position in the scan."""
    settings = RoiSettings(mask_outside_lung=config.mask_outside_lung)
    tables, totals = [], {"annotations": 0, "kept": 0, "dropped_indeterminate": 0, "nodules": 0}
    for series in lidc_scan:
        table, counts = extract_rois(series, lung_mask[series.series_uid], totals["nodules"] + 1, settings)
        tables.append(table)
        totals = {key: totals[key] + counts[key] for key in totals}
    tables = [t for t in tables if len(t)]
    rois = validate_roi_table(pd.concat(tables, ignore_index=True) if tables else empty_roi_table())
    labels = rois["label"].to_numpy()
    version = table_fingerprint(rois)
    yield Output(
        rois,
        data_version=DataVersion(version),
        metadata={
            **{key: int(value) for key, value in totals.items()},
            "benign": int((labels == 0).sum()),
            "malignant": int((labels == 1).sum()),
            "montage": MetadataValue.md(
                markdown_image(roi_montage(roi_images(rois), labels), "ROIs") if len(rois) else "no ROIs"
            ),
            "data_version": version,
        },
    )
    account = account_for_annotations(lidc_scan, rois)
    yield AssetCheckResult(
        check_name=ROIS_ACCOUNT_FOR_ANNOTATIONS,
        passed=account.balanced,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "rated_annotations": account.rated,
            "rois_kept": account.rois,
            "rated_3_dropped": account.indeterminate,
            "without_roi": MetadataValue.json(list(account.without_roi)),
            "unexplained_rois": MetadataValue.json(list(account.unexplained_rois)),
        },
    )
    outside = centres_outside(rois, lidc_scan, lung_mask)
    yield AssetCheckResult(
        check_name=CENTRES_IN_LUNG_OR_OUTLINE,
        passed=not outside,
        severity=AssetCheckSeverity.ERROR,
        metadata={"rois": len(rois), "centres_outside": len(outside), "outside": MetadataValue.json(outside[:20])},
    )
