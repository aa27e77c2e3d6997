"""Warnings when the query may be no nodule: air or aerated lung at the centre, values that are
not Hounsfield units, a query unlike the whole library, a position outside the lungs. The rules
hold on the real nodules (they must not warn of them) and answer through the searcher, the API
and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.cli import main
from nodule_pipeline.hashing.index import HashIndex, build_index
from nodule_pipeline.hashing.query_checks import (
    distance_warnings,
    image_warnings,
    library_reference,
    reference_from_index,
)
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.serve import library as describe
from nodule_pipeline_tests.test_search import _series_folder


def codes(warnings) -> list[str]:
    return [warning.code for warning in warnings]


def nodule(background: float = -850.0, core: float = 40.0, radius: float = 5.0) -> np.ndarray:
    """A solid disc in aerated lung, with a little noise: what a nodule crop looks like."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    image = np.full((32, 32), background) + rng.normal(0, 20, (32, 32))
    image[(yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= radius**2] = core
    return image.astype(np.float32)


def test_the_rules_on_constructed_queries() -> None:
    assert codes(image_warnings(nodule())) == []
    assert codes(image_warnings(nodule(core=-650.0))) == []  # ground glass is tissue
    assert codes(image_warnings(np.full((32, 32), -1000.0))) == ["no_tissue"]
    assert codes(image_warnings(nodule(core=-860.0))) == ["no_tissue"]  # aerated lung only
    (not_hu,) = image_warnings(np.full((32, 32), 0.5))
    assert not_hu.code == "not_hu" and "between 0.5 and 0.5: a normalised image" in not_hu.message
    grey = np.rint(np.linspace(0, 255, 1024)).reshape(32, 32)
    assert "8-bit grey levels, not Hounsfield units" in image_warnings(grey)[0].message
    reference = library_reference([3, 5, 8, 10], [1.0, 2.0, 3.0, 4.0])
    assert reference["sampled"] == 4 and reference["nearest_euclidean"] == pytest.approx(
        np.percentile([1, 2, 3, 4], 99)
    )


def _square_library() -> HashIndex:
    """Four nodules of two patients at the corners of the unit square in feature space, one
    per class and patient: each is 1 from its nearest nodule of the other patient."""
    fc = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    items = pd.DataFrame({"patient_id": ["A", "A", "B", "B"], "nodule_id": ["A-N01", "A-N02", "B-N01", "B-N02"]})
    same_code = np.zeros((4, 8), dtype=np.uint8)  # all tied in Hamming: the feature distance decides
    index = build_index(same_code, fc, np.array([0, 1, 0, 1]), items, "square")
    index.lineage["query_reference"] = reference_from_index(index)
    return index


def test_far_is_measured_from_the_nearest_library_nodule() -> None:
    index = _square_library()
    reference = index.lineage["query_reference"]
    assert (reference["sampled"], reference["nearest_euclidean"]) == (4, pytest.approx(1.0))
    code = np.zeros(8, dtype=np.uint8)
    assert distance_warnings(index, code, np.array([0.5, 0.5], dtype=np.float32)) == []
    (far,) = distance_warnings(index, code, np.array([5.0, 5.0], dtype=np.float32))
    assert far.code == "far_from_library" and "feature (Euclidean) distance 5.657" in far.message
    # near a nodule of patient A, far from B's: searched without A (a library nodule's own patient)
    assert codes(distance_warnings(index, code, np.array([-1.0, -1.0], dtype=np.float32), "A")) == ["far_from_library"]
    assert distance_warnings(index, code, np.array([-0.2, 0.0], dtype=np.float32), "B") == []
    index.lineage["query_reference"] = {"nearest_hamming": 0.0}  # a reference of the codes alone
    assert codes(distance_warnings(index, np.ones(8, dtype=np.uint8), np.zeros(2, np.float32))) == ["far_from_library"]
    index.lineage.pop("query_reference")  # an index built before the reference existed
    assert distance_warnings(index, code, np.array([5.0, 5.0], dtype=np.float32)) == []


def test_real_nodules_are_not_warned_of(real_nodules: Path) -> None:
    table = pd.read_parquet(real_nodules, columns=["image"])
    warned = [codes(image_warnings(np.asarray(image, dtype=np.float32).reshape(32, 32))) for image in table["image"]]
    flagged = [found for found in warned if found]
    assert len(table) == 1733 and len(flagged) <= 2, flagged  # one reader's centre lies in aerated lung


def test_the_searcher_warns_of_air_and_of_images_not_in_hu(materialized: Path, served_library: Path) -> None:
    # one patient in the index: no other patient to measure its nodules against, no far threshold
    assert NoduleSearcher.from_data_dir(materialized).index.lineage["query_reference"] == {}
    searcher = NoduleSearcher.from_data_dir(served_library)  # both patients
    reference = searcher.index.lineage["query_reference"]
    assert reference["sampled"] == len(searcher.index) and reference["nearest_hamming"] >= 0
    assert codes(searcher.search_roi(np.full((32, 32), -1000.0)).warnings)[:1] == ["no_tissue"]
    assert codes(searcher.search_roi(np.full((32, 32), 0.5)).warnings)[:1] == ["not_hu"]
    for mode in ("hierarchical", "hamming", "rerank"):  # the far rule is the same in every mode
        own = searcher.search_roi(np.asarray(searcher.index.rois[0], dtype=np.float32), mode=mode)
        assert own.warnings == [], mode  # a library nodule's own ROI: tissue, HU, at distance 0
    answer = describe.response_json(searcher, searcher.search_roi(np.full((32, 32), -1000.0)), {"kind": "image"})
    assert answer["warnings"][0]["code"] == "no_tissue" and answer["warnings"][0]["message"].startswith("no tissue")


def test_a_click_on_air_outside_the_lungs_says_so(
    materialized: Path, lidc_sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _series_folder(lidc_sample, "LIDC-IDRI-0001")
    searcher = NoduleSearcher.from_data_dir(materialized)
    response = searcher.search_dicom(folder, voxel=(20, 20, 60))
    assert codes(response.warnings) == ["outside_lungs", "no_tissue"]
    argv = ["search", "--dicom", str(folder), "--at", "20,20,60", "--data-dir", str(materialized), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.lstrip().startswith("[")  # the hits, as ever
    assert "warning: the position is outside the segmented lungs" in captured.err
    assert "warning: no tissue at the centre of the ROI" in captured.err
