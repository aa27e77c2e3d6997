"""Search from the PACS: a CT series in a real Orthanc, asked for over the JSON API, the command
line and the page's "Open from PACS", gives the same hits as the same series read from its
folder; the PACS is a server setting the page never names."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from playwright import sync_api

from nodule_pipeline.cli import main
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.lidc.series import load_series
from nodule_pipeline_tests.browser import UI_TIMEOUT_MS
from nodule_pipeline_tests.orthanc import OrthancServer, running_orthanc, sample_files, upload
from nodule_pipeline_tests.search_server import SearchServer, search_server
from nodule_pipeline_tests.test_serve_api import QUERY
from nodule_pipeline_tests.test_serve_browser import SCREENSHOTS, SLICE_SIDE, expect_pictures_shown, opened_page

PATIENT = "LIDC-IDRI-0001"
expect = sync_api.expect


@pytest.fixture(scope="module")
def orthanc(lidc_sample: Path) -> Iterator[OrthancServer]:
    with running_orthanc() as server:
        for patient in ("LIDC-IDRI-0001", "LIDC-IDRI-0003"):
            upload(server, sample_files(lidc_sample / patient))
        yield server


@pytest.fixture(scope="module")
def pacs_page(served_library: Path, orthanc: OrthancServer, tmp_path_factory) -> Iterator[SearchServer]:
    log = tmp_path_factory.mktemp("pacs-serve") / "serve.log"
    with search_server(served_library, log, "--dicomweb", orthanc.dicomweb) as running:
        yield running


@pytest.fixture(scope="module")
def query(lidc_sample: Path, served_library: Path) -> dict:
    """The sample patient's series (folder and UIDs) and a voxel inside its nodule."""
    folder = sample_files(lidc_sample / PATIENT)[0].parent
    header = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    searcher = NoduleSearcher.from_data_dir(served_library)
    item = searcher.index.items.iloc[int(searcher.nodule_rows(QUERY)[0])]
    return {
        "folder": folder,
        "study": str(header.StudyInstanceUID),
        "series": str(header.SeriesInstanceUID),
        "voxel": [int(item["center_i"]), int(item["center_j"]), int(item["center_k"])],
    }


def _dicom_file(dataset: pydicom.Dataset) -> io.BytesIO:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def _hits(answer: dict) -> list[tuple]:
    return [(h["nodule_id"], h["hamming"], round(h["euclidean"], 5)) for h in answer["hits"]]


def test_the_api_searches_a_pacs_series_as_its_folder(pacs_page: SearchServer, served_library: Path, query) -> None:
    status, listed = pacs_page.get_json("/api/pacs/studies")
    assert status == 200
    assert sorted(s["patient_id"] for s in listed["studies"]) == ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]
    status, series = pacs_page.get_json(f"/api/pacs/studies/{query['study']}/series")
    assert status == 200 and [(s["series_uid"], s["modality"]) for s in series["series"]] == [(query["series"], "CT")]

    asked = {"dicomweb": {"study": query["study"], "series": query["series"]}, "voxel": query["voxel"], "k": 5}
    status, answer = pacs_page.post_json("/api/search", asked)
    assert status == 200, answer
    folder_answer = NoduleSearcher.from_data_dir(served_library).search_dicom(
        query["folder"], tuple(query["voxel"]), k=5
    )
    expected = [(h.nodule_id, h.hamming, round(h.euclidean, 5)) for h in folder_answer.hits]
    assert _hits(answer) == expected and expected[0][0] == QUERY
    assert answer["query"]["dicomweb"] == {"study": query["study"], "series": query["series"]}
    again = pacs_page.post_json("/api/search", {"series_id": answer["query"]["series_id"], "voxel": query["voxel"]})
    assert again[0] == 200  # the fetched series is kept for further clicks


def test_pacs_faults_over_the_api(pacs_page: SearchServer, search_page: SearchServer, query) -> None:
    status, answer = pacs_page.post_json("/api/search", {"dicomweb": {"study": query["study"], "series": "1.2.3"}})
    assert status == 404 and "has no series 1.2.3 in the PACS" in answer["error"]
    status, answer = pacs_page.post_json("/api/pacs/series", {"dicomweb": {"study": "1.2; DROP", "series": "1"}})
    assert status == 400 and "DICOM UIDs" in answer["error"]
    status, answer = pacs_page.post_json("/api/pacs/series", {"dicomweb": {"study": "1.2", "url": "http://evil"}})
    assert status == 400 and "dicomweb must be {study: UID, series: UID}" in answer["error"]
    status, answer = search_page.get_json("/api/pacs/studies")  # a server started without a PACS
    assert status == 400 and "serve --dicomweb URL" in answer["error"]


def _stored(orthanc: OrthancServer, study_uid: str, sop_uid: str) -> pydicom.Dataset:
    """An object stored in the PACS, read back as a viewer would (WADO-RS)."""
    client = DICOMwebClient(orthanc.dicomweb)
    for series in client.search_for_series(study_uid):
        for instance in client.search_for_instances(study_uid, series["0020000E"]["Value"][0]):
            if instance["00080018"]["Value"][0] == sop_uid:
                return client.retrieve_instance(study_uid, series["0020000E"]["Value"][0], sop_uid)
    raise AssertionError(f"{sop_uid} is not in study {study_uid}")


def _sr_texts(report: pydicom.Dataset) -> dict[str, list]:
    """Concept name -> values of the SR's content items, depth first."""
    found: dict[str, list] = {}

    def walk(items) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            value = item.get("TextValue", None)
            if value is None and "MeasuredValueSequence" in item:
                value = float(item.MeasuredValueSequence[0].NumericValue)
            found.setdefault(name, []).append(value)
            walk(item.get("ContentSequence", []))

    walk(report.ContentSequence)
    return found


def test_the_answer_is_stored_in_the_query_study_as_sr_and_kos(
    pacs_page: SearchServer, orthanc: OrthancServer, served_library: Path, query
) -> None:
    asked = {"dicomweb": {"study": query["study"], "series": query["series"]}, "voxel": query["voxel"], "k": 3}
    status, answer = pacs_page.post_json("/api/search", asked | {"store_results": True})
    assert status == 200, answer
    stored = answer["stored"]
    assert stored["study_uid"] == query["study"]
    report = _stored(orthanc, query["study"], stored["report_uid"])
    assert report.Modality == "SR" and report.StudyInstanceUID == query["study"]
    assert report.PatientID == PATIENT  # the SR joins the query's own patient and study
    texts = _sr_texts(report)
    assert texts["Index version"] == [answer["index_version"]] and texts["Model version"] == [answer["model_version"]]
    assert texts["Query series"] == [query["series"]]
    assert texts["Query voxel (row, column, slice)"] == [", ".join(str(v) for v in query["voxel"])]
    assert texts["Nodule ID"] == [hit["nodule_id"] for hit in answer["hits"]]
    assert texts["Hamming distance"] == [float(hit["hamming"]) for hit in answer["hits"]]
    assert texts["Feature distance"] == pytest.approx([hit["euclidean"] for hit in answer["hits"]], abs=1e-6)
    first = answer["hits"][0]
    assert len(texts["Reader 1 ratings"]) == len(answer["hits"]) and "subtlety" in texts["Reader 1 ratings"][0]
    assert len([name for name in texts if name.startswith("Reader ") and name.endswith(" ratings")]) == len(
        first["readers"]
    )
    sr = hd.sr.srread(_dicom_file(report))  # highdicom reads it back as a Comprehensive SR
    assert sr.SOPInstanceUID == stored["report_uid"]

    kos = _stored(orthanc, query["study"], stored["key_images_uid"])
    assert kos.Modality == "KO"
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    slices = load_series(query["folder"], PATIENT).sop_uids  # in ascending z, as the voxel's slice counts
    assert first["nodule_id"] == QUERY and first["series_uid"] == query["series"]  # its own nodule: same series
    same_series = {slices[hit["center_k"]] for hit in answer["hits"] if hit["series_uid"] == query["series"]}
    assert referenced == {slices[query["voxel"][2]]} | same_series
    assert len(referenced) == stored["key_images"]


def test_the_cli_searches_a_pacs_series_as_its_folder(
    orthanc: OrthancServer, served_library: Path, query, capsys: pytest.CaptureFixture
) -> None:
    at = ",".join(str(v) for v in query["voxel"])
    common = ["search", "--data-dir", str(served_library), "--at", at, "--k", "5", "--json"]
    assert main([*common, "--dicomweb", orthanc.dicomweb, "--study", query["study"], "--series", query["series"]]) == 0
    from_pacs = json.loads(capsys.readouterr().out)
    assert main([*common, "--dicom", str(query["folder"])]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert from_pacs == from_folder and from_pacs[0]["nodule_id"] == QUERY
    assert main([*common, "--dicomweb", orthanc.dicomweb, "--study", query["study"]]) == 2
    assert "--dicomweb needs --study UID and --series UID" in capsys.readouterr().err
    assert main([*common, "--dicom", str(query["folder"]), "--store-results"]) == 2
    assert "--store-results" in capsys.readouterr().err
    pacs_query = ["--dicomweb", orthanc.dicomweb, "--study", query["study"], "--series", query["series"]]
    assert main([*common, *pacs_query, "--store-results"]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out) == from_pacs and f"stored in study {query['study']}: report " in said.err


def test_open_from_pacs_and_click_the_nodule(pacs_page: SearchServer, browser, query) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    row, column, index = query["voxel"]
    with opened_page(browser, pacs_page.url + "/") as page:
        page.get_by_role("button", name="Open from PACS").click()
        studies = page.locator("#pacs-studies tbody tr")
        expect(studies).to_have_count(2)
        studies.filter(has_text=PATIENT).click()
        page.locator("#pacs-series button", has_text="CT").click()
        expect(page.locator("#viewer")).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(page.locator("#slice-number")).to_have_text(re.compile(r"/ 133$"))
        page.locator("#slice").evaluate(
            "(range, k) => { range.value = k; range.dispatchEvent(new Event('input')); }", index
        )
        expect_pictures_shown(page)
        scale = SLICE_SIDE / 512
        page.locator("#slice-image").click(position={"x": (column + 0.5) * scale, "y": (row + 0.5) * scale})
        cards = page.locator("#hits > li")
        expect(cards.first).to_contain_text(QUERY)
        expect_pictures_shown(page)
        page.screenshot(path=SCREENSHOTS / "05-open-from-pacs.png", full_page=True)
        page.get_by_role("button", name="Store in PACS").click()
        expect(page.locator("#stored")).to_contain_text("stored in the study: report ")
