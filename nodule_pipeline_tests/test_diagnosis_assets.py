"""TCIA's diagnosis sheet in the pipeline, on the real sample's data dir: ``lidc_diagnosis`` and
``nodule_diagnosis`` materialized by ``run``'s own step, the match on every search hit and library
nodule (API JSON, CLI), and a missing or malformed sheet that fails nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dagster import AssetKey

from nodule_pipeline.cli import main
from nodule_pipeline.definitions import build_definitions
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.searcher import NoduleSearcher, read_diagnoses
from nodule_pipeline.lidc.diagnosis import MATCHING_RULE
from nodule_pipeline.runner import attach_diagnosis, open_instance
from nodule_pipeline.serve import library as describe
from nodule_pipeline.storage import owner_tag
from nodule_pipeline_tests.search_server import served_copy
from nodule_pipeline_tests.test_diagnosis import write_xls

CONFIRMED = {"value": "primary lung cancer", "method": "biopsy", "level": "nodule"}
SAMPLE_SHEET = [
    # patient 0001 has one nodule in the library, the sheet one: the nodule's own diagnosis
    ["LIDC-IDRI-0001", 2, 2, "", 2, 2],
    # patient 0003 has four: the sheet cannot say which one it means, so none gets it
    ["LIDC-IDRI-0003", 1, 1, "", 1, 1],
]


def diagnose(data_dir: Path, lidc_root: Path, sheet: Path | None) -> str:
    defs = build_definitions(data_dir, lidc_root, sheet)
    return attach_diagnosis(defs, open_instance(data_dir), {"test": owner_tag()})


@pytest.fixture(scope="module")
def diagnosed(materialized: Path, lidc_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the sample's data dir, both patients in the index, with a sheet for them matched."""
    data_dir = served_copy(materialized, tmp_path_factory.mktemp("diagnosed") / "data", "all")  # both patients
    sheet = write_xls(data_dir.parent / "tcia-diagnosis.xls", SAMPLE_SHEET)
    line = diagnose(data_dir, lidc_sample, sheet)
    assert line == "tcia-diagnosis.xls: 2 patients; 1 of 5 library nodules matched (1 patients)", line
    return data_dir


def test_the_match_reaches_every_hit_and_library_nodule(diagnosed: Path) -> None:
    searcher = NoduleSearcher.from_data_dir(diagnosed)
    assert searcher.diagnoses == {
        "LIDC-IDRI-0001-N01": CONFIRMED,
        **{f"LIDC-IDRI-0003-N0{i}": None for i in range(1, 5)},
    }
    response = searcher.search_nodule("LIDC-IDRI-0003-N01", k=5, mode="rerank")
    answer = describe.response_json(searcher, response, {"kind": "nodule"})
    (hit,) = [hit for hit in answer["hits"] if hit["nodule_id"] == "LIDC-IDRI-0001-N01"]
    assert hit["diagnosis"] == CONFIRMED
    assert describe.nodule_json(searcher, "LIDC-IDRI-0001-N01")["diagnosis"] == CONFIRMED
    assert describe.nodule_json(searcher, "LIDC-IDRI-0003-N02")["diagnosis"] is None


def test_the_cli_shows_the_confirmed_diagnosis(diagnosed: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["search", "--nodule", "LIDC-IDRI-0003-N01", "--data-dir", str(diagnosed), "--mode", "rerank"]
    assert main([*argv, "--json"]) == 0
    hits = {hit["nodule_id"]: hit for hit in json.loads(capsys.readouterr().out)}
    assert hits["LIDC-IDRI-0001-N01"]["diagnosis"] == CONFIRMED
    assert main(argv) == 0
    table = capsys.readouterr().out
    (line,) = [line for line in table.splitlines() if "LIDC-IDRI-0001-N01" in line]
    assert line.endswith("primary lung cancer (biopsy)") and "confirmed" in table.splitlines()[1]


def test_the_assets_record_the_rule_and_the_counts(diagnosed: Path) -> None:
    instance = open_instance(diagnosed)
    sheet = instance.get_latest_materialization_event(AssetKey("lidc_diagnosis")).asset_materialization.metadata
    assert sheet["patients"].value == 2 and sheet["source"].value == "tcia-diagnosis.xls"
    matched = instance.get_latest_materialization_event(AssetKey("nodule_diagnosis")).asset_materialization.metadata
    assert matched["rule"].value == MATCHING_RULE
    assert (matched["nodules"].value, matched["nodules_matched"].value) == (5, 1)


def test_no_sheet_and_a_malformed_sheet_fail_nothing_else(
    materialized: Path, lidc_sample: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(materialized, data_dir)
    assert diagnose(data_dir, lidc_sample, None).startswith("no diagnosis sheet (*diagnosis*.xls at the scan root")
    diagnoses = NoduleSearcher.from_data_dir(data_dir).diagnoses
    assert len(diagnoses) == 5 and set(diagnoses.values()) == {None}  # every roi_dataset nodule, none known
    broken = tmp_path / "diagnosis.xls"
    broken.write_text("Patient,Diagnosis\nLIDC-IDRI-0001,2\n")
    line = diagnose(data_dir, lidc_sample, broken)
    assert (
        line.startswith("FAILED ")
        and str(broken) in line
        and line.endswith("(the library and its search are not affected)")
    )
    searcher = NoduleSearcher.from_data_dir(data_dir)  # the index answers, with the diagnoses matched before
    assert searcher.search_roi(searcher.index.rois[0], k=1).hits
    missing = tmp_path / "nowhere.xls"
    assert "diagnosis sheet not found" in diagnose(data_dir, lidc_sample, missing)


def test_an_unreadable_match_table_is_an_error_naming_it(tmp_path: Path) -> None:
    table = tmp_path / "table.parquet"
    table.write_bytes(b"not parquet")
    with pytest.raises(InputDataError, match="the nodule diagnoses cannot be read") as refused:
        read_diagnoses(table)
    assert str(table) in str(refused.value)


def test_the_page_shows_a_confirmed_diagnosis(diagnosed: Path, browser) -> None:
    from playwright.sync_api import expect

    from nodule_pipeline_tests.search_server import search_server
    from nodule_pipeline_tests.test_serve_browser import SCREENSHOTS, opened_page, search_for

    with search_server(diagnosed, diagnosed / "serve.log") as server:
        with opened_page(browser, server.url + "/") as page:
            page.get_by_label("mode").select_option("rerank")
            search_for(page, "LIDC-IDRI-0003-N01")
            card = page.locator("#hits > li", has_text="LIDC-IDRI-0001-N01")
            expect(card.locator(".confirmed")).to_have_text("confirmed: primary lung cancer (biopsy)")
            others = page.locator("#hits > li", has_not_text="LIDC-IDRI-0001-N01")
            for other in others.all():
                expect(other.locator(".confirmed")).to_have_text("no confirmed diagnosis")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            card.screenshot(path=SCREENSHOTS / "08-confirmed-diagnosis.png")
