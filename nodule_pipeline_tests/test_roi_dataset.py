"""The split (by patient by default, the paper's ROI split as an option), its leak check, and
``roi_dataset`` fed by an external ROI table instead of LIDC-derived rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize

from nodule_pipeline.assets import ALL_ASSETS, roi_dataset
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.resources import ArtefactIOManager, ReportStore, ScanSource
from nodule_pipeline.roi_table import (
    assign_split,
    extend_split,
    invalid_images,
    malignant_fractions,
    patients_on_both_sides,
    read_roi_table,
    split_patients,
    to_arrow,
    write_roi_table,
)


def _table(patients: int = 20, rois_per_patient: int = 4, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = p % 3 == 0  # a third of the patients malignant
        for r in range(rois_per_patient):
            rows.append(
                {
                    "patient_id": f"P{p:03d}",
                    "nodule_id": f"P{p:03d}-N{r // 2:02d}",
                    "label": np.int8(label),
                    "image": rng.normal(-700, 100, 1024).astype(np.float32),
                }
            )
    return pd.DataFrame(rows)


def test_patient_split_keeps_patients_whole_and_stratified() -> None:
    table = assign_split(_table(), mode="patient", test_fraction=0.3, seed=0)
    assert patients_on_both_sides(table) == []
    test_patients = table.loc[table["split"] == "test", "patient_id"].unique()
    assert len(test_patients) == 6  # 30% of 20 patients
    by_label = table[table["split"] == "test"].groupby("label")["patient_id"].nunique()
    assert by_label[0] == 4 and by_label[1] == 2  # 30% of 13 benign and of 7 malignant patients
    again = assign_split(_table(), mode="patient", test_fraction=0.3, seed=0)
    assert again["split"].equals(table["split"])  # seeded
    other = assign_split(_table(), mode="patient", test_fraction=0.3, seed=5)
    assert not other["split"].equals(table["split"])


def test_roi_split_is_the_leaky_paper_split() -> None:
    table = assign_split(_table(), mode="roi", test_fraction=0.3, seed=0)
    assert (table["split"] == "test").sum() == 24
    assert patients_on_both_sides(table)  # the leak this mode exists to measure


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="split mode"):
        assign_split(_table(), mode="nodule")


def test_extend_split_keeps_known_patients_and_sends_new_ones_to_the_database() -> None:
    first = assign_split(_table(patients=20), mode="patient", seed=0)
    kept = split_patients(first)
    grown = extend_split(_table(patients=26), kept)
    assert split_patients(grown[grown["patient_id"].isin(first["patient_id"])]) == kept
    new = grown[~grown["patient_id"].isin(first["patient_id"])]
    assert new["patient_id"].nunique() == 6 and set(new["split"]) == {"train"}


def test_invalid_images_and_malignant_fractions() -> None:
    table = assign_split(_table(patients=10), mode="patient", seed=0)
    assert invalid_images(table) == []
    table.at[3, "image"] = np.full(1024, np.nan, dtype=np.float32)
    table.at[7, "image"] = np.zeros(1000, dtype=np.float32)
    assert invalid_images(table) == [3, 7]
    fractions = malignant_fractions(table)
    for side in ("train", "test"):
        rows = table[table["split"] == side]
        assert fractions[side] == pytest.approx(rows["label"].mean())


def _checks(result) -> dict:
    return {check.check_name: check for check in result.get_asset_check_evaluations()}


def _materialize(tmp_path: Path, config: dict, instance: DagsterInstance | None = None):
    return materialize(
        ALL_ASSETS,
        selection=[roi_dataset],
        resources={
            "io_manager": ArtefactIOManager(base_dir=str(tmp_path / "artefacts")),
            "scan_source": ScanSource(root=str(tmp_path)),
            "reports": ReportStore(folder=str(tmp_path / "reports")),
        },
        run_config={"ops": {"roi_dataset": {"config": config}}},
        raise_on_error=False,
        instance=instance,
    )


def test_external_roi_table_replaces_lidc_rows(tmp_path: Path) -> None:
    external = tmp_path / "mine.parquet"
    write_roi_table(_table(), external)
    result = _materialize(tmp_path, {"external_roi_table": str(external)})
    assert result.success
    checks = _checks(result)
    assert set(checks) == {"no_patient_on_both_sides", "rois_finite_32x32", "label_balance"}
    assert all(check.passed for check in checks.values())
    stored = read_roi_table(tmp_path / "artefacts" / "roi_dataset" / "rois.parquet")
    assert len(stored) == 80 and set(stored["split"]) == {"train", "test"}


def test_a_refresh_keeps_the_split_unless_asked_to_resplit(tmp_path: Path) -> None:
    instance = DagsterInstance.ephemeral()
    external = tmp_path / "mine.parquet"
    write_roi_table(_table(patients=20), external)
    assert _materialize(tmp_path, {"external_roi_table": str(external)}, instance).success
    stored = tmp_path / "artefacts" / "roi_dataset" / "rois.parquet"
    before = split_patients(read_roi_table(stored))
    write_roi_table(_table(patients=30), external)  # ten patients arrive
    assert _materialize(tmp_path, {"external_roi_table": str(external)}, instance).success
    after = split_patients(read_roi_table(stored))
    assert after["test"] == before["test"]  # the test split an evaluation measured on is untouched
    assert set(after["train"]) == set(before["train"]) | {f"P{p:03d}" for p in range(20, 30)}
    assert _materialize(tmp_path, {"external_roi_table": str(external), "resplit": True}, instance).success
    assert len(split_patients(read_roi_table(stored))["test"]) == 9  # a fresh 30% of 30 patients


def test_label_balance_check_warns_outside_the_bounds(tmp_path: Path) -> None:
    external = tmp_path / "mine.parquet"
    write_roi_table(_table(), external)  # a third malignant
    config = {"external_roi_table": str(external), "malignant_fraction_min": 0.4}
    check = _checks(_materialize(tmp_path, config))["label_balance"]
    assert not check.passed and check.severity.value == "WARN"
    assert check.metadata["train_malignant_fraction"].value < 0.4


def test_leak_check_fails_in_roi_mode_as_a_warning(tmp_path: Path) -> None:
    external = tmp_path / "mine.parquet"
    write_roi_table(_table(), external)
    result = _materialize(tmp_path, {"external_roi_table": str(external), "mode": "roi"})
    check = _checks(result)["no_patient_on_both_sides"]
    assert not check.passed and check.severity.value == "WARN"
    assert check.metadata["patients_on_both_sides"].value > 0


def test_external_table_with_a_bad_row_names_file_and_row(tmp_path: Path) -> None:
    table = _table()
    table["label"] = table["label"].astype(int)
    table.at[3, "label"] = 7
    external = tmp_path / "bad.parquet"
    pq.write_table(to_arrow(table), external)
    with pytest.raises(InputDataError, match=r"bad\.parquet: row 3: label 7 is not 0 or 1"):
        read_roi_table(external)
    result = _materialize(tmp_path, {"external_roi_table": str(tmp_path / "missing.parquet")})
    assert not result.success


def test_a_stored_table_that_does_not_record_its_split_settings_is_split_afresh(tmp_path: Path) -> None:
    external = tmp_path / "mine.parquet"
    write_roi_table(_table(), external)
    stored = tmp_path / "artefacts" / "roi_dataset" / "rois.parquet"
    write_roi_table(extend_split(_table(), {"test": ["P000", "P001"]}), stored)  # settings unknown
    assert _materialize(tmp_path, {"external_roi_table": str(external)}).success
    assert split_patients(read_roi_table(stored)) == split_patients(assign_split(_table(), seed=0))
