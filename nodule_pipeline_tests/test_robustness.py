"""The robustness benchmark's table kinds, cut from the real nodules' crop71, and its verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nodule_pipeline.benchmarks.robustness import (
    AIR_HU,
    TABLE_KINDS,
    candidates,
    clearly_below,
    markdown,
    segmented,
    table_kinds,
)
from nodule_pipeline.hashing.training import TrainConfig
from nodule_pipeline.roi_table import read_roi_table, roi_images


@pytest.fixture(scope="module")
def nodules(real_nodules: Path):
    return read_roi_table(real_nodules).iloc[:40].reset_index(drop=True)


def test_every_kind_is_a_32x32_hu_table_of_the_same_nodules(nodules) -> None:
    kinds = table_kinds(nodules)
    assert list(kinds) == list(TABLE_KINDS)
    original = roi_images(nodules)
    crops = np.stack(nodules["crop71"].to_numpy()).reshape(-1, 71, 71)
    for name, table in kinds.items():
        images = roi_images(table)
        assert images.shape == (40, 32, 32) and np.isfinite(images).all(), name
        assert table["nodule_id"].tolist() == nodules["nodule_id"].tolist()
        assert table["label"].tolist() == nodules["label"].tolist()
    np.testing.assert_array_equal(roi_images(kinds["as given"]), original)
    np.testing.assert_array_equal(roi_images(kinds["HU +100"]), original + 100)
    np.testing.assert_array_equal(roi_images(kinds["off centre"]), crops[:, 25:57, 25:57])
    for name in ("wide", "close"):  # resampled views keep the HU scale and differ from the original
        images = roi_images(kinds[name])
        assert images.min() >= crops.min() - 1 and images.max() <= crops.max() + 1
        assert np.abs(images - original).mean() > 20, name
    assert list(table_kinds(nodules, ["segmented", "wide"])) == ["segmented", "wide"]


def test_segmentation_keeps_the_central_nodule_and_sets_the_rest_to_air() -> None:
    roi = np.full((1, 32, 32), -850.0, dtype=np.float32)
    roi[0, 13:19, 13:19] = 40.0  # the nodule
    roi[0, 2:6, 2:6] = 60.0  # a vessel elsewhere
    cut = segmented(roi)[0]
    assert (cut[13:19, 13:19] == 40).all()
    assert cut[12, 15] == -850  # one pixel of its surroundings kept
    assert (cut[2:6, 2:6] == AIR_HU).all() and cut[25, 25] == AIR_HU


def test_a_candidate_is_clearly_below_only_beyond_a_point_and_two_standard_errors() -> None:
    assert clearly_below([0.80, 0.81, 0.79], [0.85, 0.86, 0.84])
    assert not clearly_below([0.845, 0.855, 0.835], [0.85, 0.86, 0.84])  # half a point
    assert not clearly_below([0.80, 0.88, 0.79], [0.85, 0.86, 0.84])  # inside the noise
    assert not clearly_below([0.86, 0.87, 0.85], [0.85, 0.86, 0.84])


def test_the_candidates_and_the_markdown_verdict() -> None:
    recipes = candidates()
    assert recipes["default"] == TrainConfig() and recipes["paper recipe"] == TrainConfig.paper()
    assert not recipes["CE only"].uses_ratings and recipes["CE only"].pairwise_weight == 0
    assert not recipes["default without ratings"].uses_ratings
    figures = {"accuracy": [0.8, 0.81, 0.79], "map_at_10": [0.8] * 3, "ndcg_at_10": [0.7] * 3}
    lower = {key: [v - 0.05 for v in values] for key, values in figures.items()}
    for row in (figures, lower):
        row["ndcg_at_10_within_class"] = [0.9] * 3
    report = {"splits": 3, "epochs": 12, "results": {"wide": {"default": lower, "CE only": figures}}}
    text = markdown(report)
    assert "| wide | 0.750 ± 0.008 / 0.650 / 0.900 | 0.800 ± 0.008 / 0.700 / 0.900 |" in text
    assert "- wide: the default is clearly below CE only on accuracy" in text
    fine = {"splits": 3, "epochs": 12, "results": {"wide": {"default": figures, "CE only": lower}}}
    assert "never clearly below" in markdown(fine)
