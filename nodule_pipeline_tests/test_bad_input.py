"""Bad input gives a clear error naming the patient and file; other patients are unaffected and
nothing already materialized is lost. Built from the real sample (symlinks, one file altered)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from nodule_pipeline.roi_table import read_roi_table
from nodule_pipeline.runner import run_pipeline
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.conftest import NO_ACCURACY_FLOOR
from nodule_pipeline_tests.lidc_downloads import link_patient, series_dir

QUIET = {"training": NO_ACCURACY_FLOOR, "report": "none"}

GOOD = "LIDC-IDRI-0001"


def _link_patient(sample: Path, root: Path, source_id: str, target_id: str) -> Path:
    """Mirror a sample patient under a new id with symlinks; returns its series folder."""
    return series_dir(link_patient(sample / source_id, root / target_id))


def _replace_with_copy(path: Path) -> bytes:
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture(scope="module")
def broken_root(lidc_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lidc")
    _link_patient(lidc_sample, root, GOOD, GOOD)

    truncated = _link_patient(lidc_sample, root, GOOD, "BAD-TRUNCATED")
    victim = sorted(truncated.glob("*.dcm"))[40]
    data = _replace_with_copy(victim)
    victim.write_bytes(data[: len(data) // 2])

    missing = _link_patient(lidc_sample, root, GOOD, "BAD-MISSING-SLICE")
    by_z = sorted(
        missing.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )
    by_z[60].unlink()

    second = _link_patient(lidc_sample, root, GOOD, "BAD-TWO-SERIES")
    intruder = sorted(second.glob("*.dcm"))[10]
    ds = pydicom.dcmread(intruder)
    intruder.unlink()
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.save_as(second / "intruder.dcm")

    bad_xml = _link_patient(lidc_sample, root, GOOD, "BAD-XML")
    (xml,) = list(bad_xml.glob("*.xml"))
    text = _replace_with_copy(xml).decode()
    xml.write_text(text[: len(text) // 3])

    no_annotations = _link_patient(lidc_sample, root, GOOD, "NO-ANNOTATIONS")
    (xml,) = list(no_annotations.glob("*.xml"))
    text = _replace_with_copy(xml).decode()
    header_end = text.index("</ResponseHeader>") + len("</ResponseHeader>")
    xml.write_text(text[:header_end] + "\n</LidcReadMessage>\n")
    return root


@pytest.fixture(scope="module")
def first_run(broken_root: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("data")
    lines: list[str] = []
    summary = run_pipeline(broken_root, data_dir, progress=lines.append, training=NO_ACCURACY_FLOOR, report="none")
    return data_dir, summary, lines


def test_each_bad_patient_fails_with_patient_file_and_reason(first_run) -> None:
    _, summary, _ = first_run
    errors = {o.patient_id: o.error for o in summary.failed}
    assert set(errors) == {"BAD-TRUNCATED", "BAD-MISSING-SLICE", "BAD-TWO-SERIES", "BAD-XML"}
    assert "BAD-TRUNCATED" in errors["BAD-TRUNCATED"] and ".dcm" in errors["BAD-TRUNCATED"]
    assert "missing slice" in errors["BAD-MISSING-SLICE"] and ".dcm" in errors["BAD-MISSING-SLICE"]
    assert "more than one series" in errors["BAD-TWO-SERIES"]
    assert "malformed LIDC XML" in errors["BAD-XML"] and ".xml" in errors["BAD-XML"]
    for patient_id, error in errors.items():
        assert patient_id in error
    ingestion = summary.ingestion
    assert (ingestion["patients_ok"], ingestion["patients_failed"]) == (2, 4)
    assert sum(ingestion["failed_by_reason"].values()) == 4
    assert "malformed LIDC XML" in ingestion["failed_by_reason"]
    assert not any("BAD-" in reason for reason in ingestion["failed_by_reason"])


def test_good_patients_are_unaffected(first_run) -> None:
    data_dir, summary, _ = first_run
    ok = {o.patient_id: o for o in summary.outcomes if o.ok}
    assert set(ok) == {GOOD, "NO-ANNOTATIONS"}
    assert ok[GOOD].metadata["kept"] == 4
    assert ok["NO-ANNOTATIONS"].metadata["kept"] == 0  # not an error: zero ROIs
    dataset = read_roi_table(artefact_folder(artefacts_dir(data_dir), ["roi_dataset"]) / "rois.parquet")
    assert set(dataset["patient_id"]) == {GOOD}
    assert summary.library_ok


def test_unsafe_partition_key_is_refused(first_run, broken_root: Path) -> None:
    data_dir, _, _ = first_run
    summary = run_pipeline(
        broken_root, data_dir, patients=["../x"], progress=lambda _: None, training=NO_ACCURACY_FLOOR, report="none"
    )
    (outcome,) = summary.outcomes
    assert not outcome.ok and "'../x' is not a safe name" in outcome.error
    assert not (data_dir / "x").exists() and not (data_dir.parent / "x").exists()


def test_breaking_a_materialized_patient_keeps_its_results(first_run, broken_root: Path) -> None:
    data_dir, _, _ = first_run
    rois_file = artefact_folder(artefacts_dir(data_dir), ["nodule_rois"], GOOD) / "rois.parquet"
    before = read_roi_table(rois_file)
    (series,) = {p.parent for p in (broken_root / GOOD).rglob("*.dcm")}
    victim = sorted(series.glob("*.dcm"))[5]
    data = _replace_with_copy(victim)
    victim.write_bytes(data[:200])
    try:
        summary = run_pipeline(
            broken_root, data_dir, patients=[GOOD], progress=lambda _: None, training=NO_ACCURACY_FLOOR, report="none"
        )
    finally:
        victim.write_bytes(data)
    (outcome,) = summary.outcomes
    assert not outcome.ok and victim.name in outcome.error
    after = read_roi_table(rois_file)
    assert after[["annotation_id", "label"]].equals(before[["annotation_id", "label"]])
