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
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from nodule_pipeline.assets.refresh import WHEN_NEW_ROIS
from nodule_pipeline.assets.split_leak import MODEL_NOT_TRAINED_ON_TEST_PATIENTS
from nodule_pipeline.currency import latest_failure, latest_record, metadata_of
from nodule_pipeline.ingest_summary import PatientIngest, summarise_ingestion, summary_lines
from nodule_pipeline.partitions import patients_partitions
from nodule_pipeline.pictures import markdown_image, roi_montage
from nodule_pipeline.roi_table import (
    SPLIT_COLUMN,
    TEST,
    assign_split,
    empty_roi_table,
    extend_split,
    invalid_images,
    malignant_fractions,
    patients_on_both_sides,
    read_roi_table,
    roi_images,
    split_patients,
    split_settings,
    table_fingerprint,
    with_split_settings,
)

NO_PATIENT_ON_BOTH_SIDES = "no_patient_on_both_sides"
ROIS_FINITE_32X32 = "rois_finite_32x32"
LABEL_BALANCE = "label_balance"


class SplitConfig(Config):
    """How the table is split. ``patient`` (default) keeps each patient on one side; ``roi`` is
    the paper's random split of ROIs (leaky, kept to measure the leak). ``external_roi_table``
    replaces the LIDC-derived rows with any parquet table of the ROI-table contract.

    In patient mode a refresh keeps the previous split (same mode, fraction and seed): known
    patients stay on their side and new patients join the training side, the search database.
    ``resplit`` draws a fresh split instead. ``malignant_fraction_min``/``_max`` bound the share
    of malignant ROIs on each side (the ``label_balance`` check)."""

    mode: Literal["patient", "roi"] = "patient"
    test_fraction: float = 0.3
    seed: int = 0
    external_roi_table: str | None = None
    resplit: bool = False
    malignant_fraction_min: float = 0.2
    malignant_fraction_max: float = 0.8

    def split_settings(self) -> dict:
        """The settings that draw a split: a stored split is kept only when they match."""
        return {"mode": self.mode, "test_fraction": self.test_fraction, "seed": self.seed}


def ingestion_summary(context: AssetExecutionContext, ingested: set[str]) -> dict:
    """The ingestion of every registered patient added up: those with ROIs from their latest
    ``lidc_scan``/``nodule_rois`` metadata, the others with the reason their last run failed."""
    instance = context.instance
    patients = []
    for patient in sorted(set(instance.get_dynamic_partitions(patients_partitions.name)) | ingested):
        if patient in ingested:
            scan, rois = (metadata_of(latest_record(instance, name, patient)) for name in ("lidc_scan", "nodule_rois"))
            patients.append(PatientIngest(patient, scan, rois))
        else:
            patients.append(PatientIngest(patient, error=latest_failure(instance, patient) or "not ingested yet"))
    return summarise_ingestion(patients)


def missing_test_split(table: pd.DataFrame, config: SplitConfig) -> str | None:
    """Why a table of ROIs has no test side, in words (None when it has one)."""
    if not len(table) or (table[SPLIT_COLUMN] == TEST).any():
        return None
    patients = table["patient_id"].nunique()
    return (
        f"no test split: a patient split sends round({config.test_fraction} x n) of each label's n patients to "
        f"test: none of the {patients} patient(s) here. hash_model trains on every ROI and stays unmeasured, and "
        "retrieval_evaluation is skipped; add patients (or raise test_fraction in roi_dataset's config) to measure"
    )


def previous_split(context: AssetExecutionContext, config: SplitConfig) -> dict[str, list[str]] | None:
    """The patient split of the stored ``roi_dataset`` table when it was drawn with the same
    settings. Read from the table, not the event log: a new instance over the same data dir
    (SQLite to PostgreSQL) keeps the split the stored model was trained on."""
    if config.resplit or config.mode != "patient":
        return None
    stored = context.resources.io_manager.stored(context.asset_key.path)
    if stored is None:
        return None
    settings = split_settings(stored)
    if settings != config.split_settings():
        context.log.warning(
            f"the stored split was drawn with {settings or 'settings it does not record'}, not "
            f"{config.split_settings()}: a fresh split is drawn; hash_index's {MODEL_NOT_TRAINED_ON_TEST_PATIENTS} "
            "check says whether hash_model must be retrained"
        )
        return None
    return split_patients(stored)


@asset(
    group_name="dataset",
    code_version="2",
    kinds={"parquet"},
    automation_condition=WHEN_NEW_ROIS,
    check_specs=[
        AssetCheckSpec(NO_PATIENT_ON_BOTH_SIDES, asset="roi_dataset", blocking=True),
        AssetCheckSpec(ROIS_FINITE_32X32, asset="roi_dataset", blocking=True),
        AssetCheckSpec(LABEL_BALANCE, asset="roi_dataset"),
    ],
)
def roi_dataset(context: AssetExecutionContext, config: SplitConfig, nodule_rois: dict[str, pd.DataFrame]):
    """The union of every materialized patient's ROIs plus a ``split`` column (70/30 by default);
    refreshes by itself when patients' ROIs land."""
    if config.external_roi_table:
        source = config.external_roi_table
        table = read_roi_table(Path(source))
    else:
        source = f"nodule_rois ({len(nodule_rois)} patients)"
        parts = [t for _, t in sorted(nodule_rois.items()) if len(t)]
        table = pd.concat(parts, ignore_index=True) if parts else empty_roi_table()
    kept = previous_split(context, config)
    if not len(table):
        table = table.assign(split="")
    elif kept is not None:
        table = extend_split(table, kept)
        known = set(kept["train"]) | set(kept["test"])
        context.log.info(
            f"kept the earlier split of {len(known)} patients; "
            f"{table.loc[~table['patient_id'].isin(known), 'patient_id'].nunique()} new patient(s) join the database"
        )
    else:
        table = assign_split(table, config.mode, config.test_fraction, config.seed)
    no_test = missing_test_split(table, config)
    if no_test:
        context.log.warning(no_test)
    ingestion = ingestion_summary(context, set(nodule_rois)) if not config.external_roi_table else None
    leaks = patients_on_both_sides(table)
    counts = table.groupby([SPLIT_COLUMN, "label"]).size()
    split_table = {f"{side}_{'malignant' if label else 'benign'}": int(n) for (side, label), n in counts.items()}
    fractions = malignant_fractions(table) if len(table) else {}
    bad_rows = invalid_images(table)
    version = table_fingerprint(table)
    table = with_split_settings(table, config.split_settings())
    yield Output(
        table,
        data_version=DataVersion(version),
        metadata={
            "rows": len(table),
            "patients": int(table["patient_id"].nunique()),
            "nodules": int(table["nodule_id"].nunique()),
            "split_mode": config.mode,
            "seed": config.seed,
            "source": source,
            "data_version": version,
            "split_kept": kept is not None,
            **({"no_test_split": no_test} if no_test else {}),
            **(
                {
                    "ingestion": MetadataValue.json(ingestion),
                    "ingestion_summary": MetadataValue.md("\n".join(f"- {line}" for line in summary_lines(ingestion))),
                    "patients_failed": ingestion["patients_failed"],
                    "series_skipped": sum(ingestion["series_skipped_by_modality"].values()),
                    "duplicate_slices_resolved": ingestion["duplicate_slices_resolved"],
                }
                if ingestion
                else {}
            ),
            "split_settings": MetadataValue.json(config.split_settings()),
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
    yield AssetCheckResult(
        check_name=ROIS_FINITE_32X32,
        passed=not bad_rows,
        metadata={"rois": len(table), "invalid_rows": len(bad_rows), "examples": MetadataValue.json(bad_rows[:10])},
    )
    low, high = config.malignant_fraction_min, config.malignant_fraction_max
    yield AssetCheckResult(
        check_name=LABEL_BALANCE,
        passed=bool(fractions) and all(f is not None and low <= f <= high for f in fractions.values()),
        severity=AssetCheckSeverity.WARN,
        metadata={
            **{f"{side}_malignant_fraction": round(f, 3) if f is not None else -1.0 for side, f in fractions.items()},
            "bounds": MetadataValue.json([low, high]),
        },
    )
