"""``roi_dataset``: all patients' ROIs (or an external ROI table) with a leak-free split."""

from pathlib import Path
from typing import Literal

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
)

from nodule_pipeline.pictures import markdown_image, roi_montage
from nodule_pipeline.roi_table import (
    SPLIT_COLUMN,
    assign_split,
    empty_roi_table,
    patients_on_both_sides,
    read_roi_table,
    roi_images,
)

NO_PATIENT_ON_BOTH_SIDES = "no_patient_on_both_sides"


class SplitConfig(Config):
    """How the table is split. ``patient`` (default) keeps each patient on one side; ``roi`` is
    the paper's random split of ROIs (leaky, kept to measure the leak). ``external_roi_table``
    replaces the LIDC-derived rows with any parquet table of the ROI-table contract."""

    mode: Literal["patient", "roi"] = "patient"
    test_fraction: float = 0.3
    seed: int = 0
    external_roi_table: str | None = None


@asset(
    group_name="dataset",
    code_version="1",
    kinds={"parquet"},
    check_specs=[AssetCheckSpec(NO_PATIENT_ON_BOTH_SIDES, asset="roi_dataset", blocking=True)],
)
def roi_dataset(context: AssetExecutionContext, config: SplitConfig, nodule_rois: dict[str, pd.DataFrame]):
    """The union of every materialized patient's ROIs plus a ``split`` column (70/30 by default)."""
    if config.external_roi_table:
        source = config.external_roi_table
        table = read_roi_table(Path(source))
    else:
        source = f"nodule_rois ({len(nodule_rois)} patients)"
        parts = [t for _, t in sorted(nodule_rois.items()) if len(t)]
        table = pd.concat(parts, ignore_index=True) if parts else empty_roi_table()
    table = (
        assign_split(table, config.mode, config.test_fraction, config.seed) if len(table) else table.assign(split="")
    )
    leaks = patients_on_both_sides(table)
    counts = table.groupby([SPLIT_COLUMN, "label"]).size()
    split_table = {f"{side}_{'malignant' if label else 'benign'}": int(n) for (side, label), n in counts.items()}
    yield Output(
        table,
        metadata={
            "rows": len(table),
            "patients": int(table["patient_id"].nunique()),
            "nodules": int(table["nodule_id"].nunique()),
            "split_mode": config.mode,
            "seed": config.seed,
            "source": source,
            **split_table,
            "montage": MetadataValue.md(
                markdown_image(roi_montage(roi_images(table), table["label"].to_numpy()), "ROIs")
                if len(table)
                else "empty"
            ),
        },
    )
    yield AssetCheckResult(
        check_name=NO_PATIENT_ON_BOTH_SIDES,
        passed=not leaks,
        severity=AssetCheckSeverity.ERROR if config.mode == "patient" else AssetCheckSeverity.WARN,
        metadata={
            "patients_on_both_sides": len(leaks),
            "examples": MetadataValue.json(leaks[:10]),
            "mode": config.mode,
        },
    )
