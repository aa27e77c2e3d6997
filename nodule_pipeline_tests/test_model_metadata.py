"""What ``hash_model`` and the pictures tell users: the settings it trained with (no nulls, floats
readable), whether validation ran, and captions that name every nodule in full and fit."""

from __future__ import annotations

from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, build_asset_context
from PIL import Image, ImageDraw

from nodule_pipeline.assets.model import TrainingConfig, hash_model
from nodule_pipeline.hashing import report
from nodule_pipeline.hashing.training import MIN_VALIDATION_PATIENTS, EpochStats
from nodule_pipeline.pictures import caption_font, hit_caption, search_results, training_curves_figure
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, assign_split
from nodule_pipeline_tests.test_evaluation import blob_or_ring

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG_IDS = ["LIDC-IDRI-0526-N01", "LIDC-IDRI-0188-N10", "LIDC-IDRI-0188-N11", "P7-N1", "no-spaces-in-a-long-identifier"]


def _table(patients: int) -> pd.DataFrame:
    """Two nodules a patient, a blob and a ring, split by patient."""
    rng = np.random.default_rng(0)
    rows = [
        {
            "patient_id": f"LIDC-IDRI-{p:04d}",
            "nodule_id": f"LIDC-IDRI-{p:04d}-N0{label}",
            "label": np.int8(label),
            "image": blob_or_ring(label, rng).reshape(-1),
        }
        for p in range(patients)
        for label in (0, 1)
    ]
    return assign_split(pd.DataFrame(rows), test_fraction=0.2)


def _materialize(table: pd.DataFrame, **config) -> dict:
    """``hash_model``'s metadata, trained one epoch on ``table``."""
    context = build_asset_context(instance=DagsterInstance.ephemeral())
    settings = TrainingConfig(bits=32, epochs=1, num_threads=1, accuracy_floor=0.0, **config)
    output = next(iter(hash_model(context, settings, table)))
    return {key: getattr(value, "value", value) for key, value in output.metadata.items()}


def _floats(value) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [f for item in value for f in _floats(item)] if isinstance(value, list) else []


def test_the_config_shows_the_settings_used_and_validation_skipped_says_why() -> None:
    table = _table(12)
    train_patients = table.loc[table[SPLIT_COLUMN] == TRAIN, "patient_id"].nunique()
    assert train_patients * 0.1 < MIN_VALIDATION_PATIENTS  # the default fraction leaves no validation split
    metadata = _materialize(table)
    config, card = metadata["config"], metadata["card"]
    assert not [name for name, value in config.items() if value is None]
    assert config["validation_fraction"] == 0.0 and card["training"]["validation_fraction"] == 0.0
    assert config["learning_rate"] == 1e-3 and config["lstm_hidden"] == 128 and config["epochs"] == 1
    assert config["early_stopping_patience"] == 10 and config["num_threads"] == 1
    skipped = f"skipped: {train_patients} training patients, fewer than 50"
    assert metadata["validation"].startswith(skipped) and card["validation"] == metadata["validation"]
    assert card["validation_patients"] == 0
    measured = {key: value for key, value in metadata.items() if key != "config"}
    assert any(f != round(f) for f in _floats(measured))  # there are fractions to round
    assert all(f == float(f"{f:.4g}") for f in _floats(measured)), _floats(measured)


def test_validation_that_ran_is_said_with_its_patients() -> None:
    table = _table(14)
    train_patients = table.loc[table[SPLIT_COLUMN] == TRAIN, "patient_id"].nunique()
    metadata = _materialize(table, validation_fraction=0.5)
    held = metadata["card"]["validation_patients"]
    assert 0 < held < train_patients
    assert metadata["validation"].startswith(f"ran: {held} of {train_patients} training patients held out")
    assert metadata["config"]["validation_fraction"] == 0.5 == metadata["card"]["training"]["validation_fraction"]


def test_the_runner_sees_the_same_settings_as_current_and_others_not() -> None:
    """``runner.stale_library`` retrains when a setting asked for differs from the ``config``
    shown: the settings of ``nodule-pipeline run`` (and the tests' quick training) compare equal."""
    config = _materialize(_table(12))["config"]
    asked = {"epochs": 1, "recipe": "default", "bits": 32, "accuracy_floor": 0.0}
    assert all(config[key] == value for key, value in asked.items())
    assert config["epochs"] != 2 and config["bits"] != 64 and config["recipe"] != "paper"


def _epochs(validated: bool) -> list[EpochStats]:
    return [
        EpochStats(e, 1.0 / e, 0.5, 0.9 if validated else None, 0.6 if validated else None, 1.0, 10.0)
        for e in (1, 2, 3)
    ]


@pytest.mark.parametrize("validated", [True, False])
def test_the_training_curves_mention_validation_only_when_it_ran(validated: bool) -> None:
    import matplotlib.pyplot as plt

    figure = training_curves_figure(_epochs(validated), 3, "ours, 32 bits")
    texts = " ".join(text.get_text() for text in figure.findobj(plt.Text))
    plt.close(figure)
    assert ("validation" in texts) == validated
    assert "kept: 3" in texts


def _boxes(lines) -> list[tuple[int, int, int, int]]:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return [draw.textbbox(line.xy, line.text, font=caption_font()) for line in lines]


@pytest.mark.parametrize("zoom", [2, 3])
def test_every_caption_is_whole_and_fits_its_tile(zoom: int) -> None:
    roi = np.full((32, 32), -800.0)
    captions = [hit_caption(rank, nodule, f"ham {rank * 7}") for rank, nodule in enumerate(LONG_IDS, 9)]
    montage = search_results(roi, "query\np(malig.) 0.87", [roi] * 5, [0, 1, 0, 1, 0], captions, zoom)
    canvas, lines, tile_height = montage.image, montage.captions, 32 * zoom + 6
    tiles = sorted({line.tile for line in lines})
    assert len(tiles) == 6
    for tile, caption in zip(tiles, ["query\np(malig.) 0.87", *captions], strict=True):
        drawn = [line.text for line in lines if line.tile == tile]
        assert "".join(drawn).replace(" ", "") == caption.replace(" ", "").replace("\n", "")
    for line, (left, top, right, bottom) in zip(lines, _boxes(lines), strict=True):
        assert line.tile[0] <= left and right <= line.tile[1], line
        assert tile_height <= top and bottom <= canvas.height, line  # below the ROI, on the picture
    for (a, box_a), (b, box_b) in combinations(zip(lines, _boxes(lines), strict=True), 2):
        apart = box_a[2] <= box_b[0] or box_b[2] <= box_a[0] or box_a[3] <= box_b[1] or box_b[3] <= box_a[1]
        assert apart, (a, b)
    if zoom == 3:  # an LIDC id has a line of its own at the CLI's zoom
        assert {"LIDC-IDRI-0526-N01", "#9 ham 63"} <= {line.text for line in lines}


def test_the_report_examples_name_each_hit_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    table = _table(10)
    queries, database = table[table[SPLIT_COLUMN] == TEST], table[table[SPLIT_COLUMN] == TRAIN]
    database = database.assign(nodule_id=[f"LIDC-IDRI-{i:04d}-N{i % 13:02d}" for i in range(len(database))])
    rankings = [list(range(len(database)))[:10] for _ in range(len(queries))]
    seen: list[list[str]] = []

    def recording(query, query_caption, results, labels, captions, *args, **kwargs):
        seen.append([query_caption, *captions])
        return real(query, query_caption, results, labels, captions, *args, **kwargs)

    real = report.search_results
    monkeypatch.setattr(report, "search_results", recording)
    evaluation = SimpleNamespace(query_rows=queries, database_rows=database, example_rankings=rankings)
    assert report.examples_figure(evaluation)[:4] == b"\x89PNG"
    assert len(seen) == min(report.EXAMPLE_QUERIES, len(queries))
    for query_caption, *captions in seen:
        assert query_caption.split("\n")[-1] in set(queries["nodule_id"])
        assert captions == [f"#{rank}\n{database['nodule_id'].iloc[rank - 1]}" for rank in range(1, 11)]
