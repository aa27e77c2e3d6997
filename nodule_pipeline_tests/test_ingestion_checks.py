"""The per-patient checks of the ingestion assets: their measures fail where the data is wrong,
and a scan that is not in Hounsfield units stops its patient's run before a mask is cut."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dagster import AssetKey

from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.lidc.lung_mask import lung_volume_plausible, segment_lungs
from nodule_pipeline.lidc.rois import account_for_annotations, centres_outside, extract_rois
from nodule_pipeline.lidc.series import CtSeries, find_series_folders, hu_range, load_series
from nodule_pipeline.runner import open_instance

PATIENT = "LIDC-IDRI-0957"  # 65 slices: small and quick


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lidc")
    generate_patient(PATIENT, root, seed=0)
    return root


@pytest.fixture(scope="module")
def series(generated: Path) -> CtSeries:
    (folder,) = find_series_folders(generated / PATIENT, PATIENT).ct_folders
    return load_series(folder, PATIENT)


@pytest.fixture(scope="module")
def mask(series: CtSeries) -> np.ndarray:
    return segment_lungs(np.asarray(series.hu), series.spacing_mm)


def test_hu_range_tells_a_ct_from_unrescaled_or_misscaled_values(series: CtSeries) -> None:
    hu = np.asarray(series.hu)
    assert hu_range(hu).plausible
    assert not hu_range(hu + 1024).plausible  # the stored values, RescaleIntercept not applied: no air
    assert not hu_range(hu.astype(np.int32) * 10).plausible  # a wrong slope
    assert not hu_range(np.full_like(hu, 40)).plausible  # soft tissue only


def test_lung_volume_range() -> None:
    assert lung_volume_plausible(3800.0) and lung_volume_plausible(1000.0) and lung_volume_plausible(10000.0)
    assert not lung_volume_plausible(300.0) and not lung_volume_plausible(15000.0)


def test_rois_account_for_every_rated_annotation(series: CtSeries, mask: np.ndarray) -> None:
    rois, counts = extract_rois(series, mask)
    account = account_for_annotations([series], rois)
    assert account.balanced and account.rated == counts["annotations"] > account.indeterminate > 0
    assert account.rois + account.indeterminate == account.rated
    missing = account_for_annotations([series], rois.iloc[1:])
    assert not missing.balanced and missing.without_roi == (rois["annotation_id"].iloc[0],)
    doubled = account_for_annotations([series], rois.assign(annotation_id=rois["annotation_id"].str.upper() + "X"))
    assert not doubled.balanced and len(doubled.unexplained_rois) == len(rois)


def test_roi_centres_outside_lung_and_outline_are_named(series: CtSeries, mask: np.ndarray) -> None:
    rois, _ = extract_rois(series, mask)
    assert centres_outside(rois, [series], {series.series_uid: mask}) == []
    moved = rois.copy()
    moved.loc[moved.index[0], ["center_i", "center_j"]] = (0, 0)  # the corner of the image: room air
    assert centres_outside(moved, [series], {series.series_uid: mask}) == [rois["annotation_id"].iloc[0]]
    moved.loc[moved.index[1], "center_k"] = series.shape[2] + 5  # beyond the last slice
    assert len(centres_outside(moved, [series], {series.series_uid: mask})) == 2
    other = replace(series, series_uid="another-series")
    assert len(centres_outside(rois, [other], {"another-series": mask})) == len(rois)


def test_a_scan_not_in_hu_stops_its_patient_before_the_mask(generated: Path, tmp_path: Path) -> None:
    root = tmp_path / "lidc"
    for path in (generated / PATIENT).rglob("*"):
        target = root / path.relative_to(generated)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            ds.RescaleIntercept = "0"  # a scanner export that forgot the intercept: air at +24
            ds.save_as(target)
        else:
            target.write_bytes(path.read_bytes())
    data_dir = tmp_path / "data"
    defs = build_definitions(data_dir, root)
    instance = open_instance(data_dir)
    instance.add_dynamic_partitions("patients", [PATIENT])
    result = defs.resolve_job_def("ingest_patient").execute_in_process(
        instance=instance, partition_key=PATIENT, raise_on_error=False
    )
    assert not result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert (evaluation.check_name, evaluation.partition, evaluation.passed) == ("hu_range_plausible", PATIENT, False)
    assert evaluation.metadata["lowest_hu"].value >= 0
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert materialized == {AssetKey("lidc_scan")}  # stored and on record, no mask or ROIs cut from it
