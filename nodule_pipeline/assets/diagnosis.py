"""What a nodule really was: TCIA's diagnosis spreadsheet (biopsy, resection, two-year stability,
progression) as an asset, and its match to the library's nodules under one stated rule.

The readers' malignancy ratings are suspicion; this is the only diagnosis LIDC has, for 157
patients. Neither asset is upstream of the index: a missing or malformed sheet never holds back
ingestion or search, it only leaves hits without a confirmed diagnosis.
"""

import pandas as pd
from dagster import AssetExecutionContext, AutomationCondition, MetadataValue, Output, asset

from nodule_pipeline.lidc.diagnosis import (
    MATCHING_RULE,
    empty_sheet,
    find_diagnosis_sheet,
    match_diagnoses,
    read_diagnosis_sheet,
    sheet_fingerprint,
)
from nodule_pipeline.resources import ScanSource


@asset(group_name="diagnosis", code_version="1", kinds={"parquet"})
def lidc_diagnosis(context: AssetExecutionContext, scan_source: ScanSource) -> Output[pd.DataFrame]:
    """TCIA's diagnosis sheet as users download it (``*diagnosis*.xls`` at the scan root, or the
    scan source's ``diagnosis_sheet``): one row per patient and per listed nodule, codes decoded.
    No sheet is an empty table, not a failure; a malformed one fails naming file, sheet and column."""
    path = find_diagnosis_sheet(scan_source.sheet_folder, scan_source.diagnosis_sheet or None)
    if path is None:
        context.log.info("no diagnosis sheet (*diagnosis*.xls) at the scan root: hits carry no confirmed diagnosis")
        metadata = {"source": "none", "sheet_fingerprint": sheet_fingerprint(None), "patients": 0, "listed_nodules": 0}
        return Output(empty_sheet(), metadata=metadata)
    table = read_diagnosis_sheet(path)
    patients = table[table["level"] == "patient"]
    return Output(
        table,
        metadata={
            "source": path.name,
            "sheet_fingerprint": sheet_fingerprint(path),
            "patients": len(patients),
            "listed_nodules": int((table["level"] == "nodule").sum()),
            "patient_diagnoses": MetadataValue.json(_counts(patients["diagnosis"])),
            "patient_methods": MetadataValue.json(_counts(patients["method"])),
        },
    )


@asset(
    group_name="diagnosis",
    code_version="1",
    kinds={"parquet"},
    automation_condition=AutomationCondition.eager(),
)
def nodule_diagnosis(roi_dataset: pd.DataFrame, lidc_diagnosis: pd.DataFrame) -> Output[pd.DataFrame]:
    """Each library nodule with its confirmed diagnosis where the matching rule gives one (value,
    method, and whether it is the nodule's own or its patient's); the search shows it on every hit."""
    nodules = roi_dataset[["patient_id", "nodule_id"]].drop_duplicates("nodule_id").astype(str)
    table, summary = match_diagnoses(nodules.reset_index(drop=True), lidc_diagnosis)
    return Output(
        table,
        metadata={
            "rule": MetadataValue.md(MATCHING_RULE),
            "nodules": summary["nodules"],
            "nodules_matched": summary["nodules_matched"],
            "patients_matched": summary["patients_matched"],
            "library_patients_in_sheet": summary["library_patients_in_sheet"],
            "nodules_by_level": MetadataValue.json(summary["nodules_by_level"]),
            "diagnoses": MetadataValue.json(summary["diagnoses"]),
        },
    )


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(key): int(count) for key, count in values.value_counts().sort_index().items()}
