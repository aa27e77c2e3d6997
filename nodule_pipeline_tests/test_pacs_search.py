"""Search from the PACS: a CT series in a real Orthanc, asked for over the JSON API, the command
line and the page's "Open from PACS", gives the same hits as the same series read from its
folder; the PACS is a server setting the page never names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from playwright import sync_api

from nodule_pipeline.cli import main
from nodule_pipeline.hashing.searcher import NoduleSearcher
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
