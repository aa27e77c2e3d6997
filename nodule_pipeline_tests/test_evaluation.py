"""The evaluation report: every field of the JSON shape other tools read, written by the
``evaluate-rois`` CLI from any ROI table, on separable generated data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.cli import main
from nodule_pipeline.hashing.evaluation import (
    PAPER_OBJECTIVE,
    PAPER_RECIPE,
    RAW_KNN,
    WITHOUT_RATINGS,
    Deployed,
    EvaluationConfig,
    NotEnoughData,
    evaluate,
    evaluate_model,
    ranking_metrics,
)
from nodule_pipeline.hashing.index import build_index
from nodule_pipeline.hashing.network import NetworkConfig
from nodule_pipeline.hashing.report import NO_READER_AGREEMENT, render_markdown, write_report
from nodule_pipeline.hashing.search import rank_by_hamming, stable_keys
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.hashing.training import TrainConfig, classification_metrics, encode, train_hash_model
from nodule_pipeline.roi_table import assign_split, roi_images, write_roi_table

METHOD_FIELDS = {"map_at_k", "p_at_10", "precision_at_10", "recall_at_10", "f1_at_10"}
CLASSIFIER_FIELDS = {"accuracy", "recall", "f1"}


_RADIUS = np.hypot(*(np.mgrid[:32, :32] - 16))


def blob_or_ring(label: int, rng: np.random.Generator) -> np.ndarray:
    """A separable ROI in HU on noisy aerated lung: a solid bright blob (malignant) or a faint ring."""
    image = np.full((32, 32), -850.0) + rng.normal(0, 30, (32, 32))
    if label:
        image[_RADIUS < rng.uniform(5, 8)] = 40
    else:
        image[(_RADIUS > 6) & (_RADIUS < 8)] = -400
    return image.astype(np.float32)


def _separable_table(patients: int = 14, per_patient: int = 8, seed: int = 0) -> pd.DataFrame:
    """Solid bright blobs (malignant) against faint rings (benign), in HU, with ratings."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for r in range(per_patient):
            label = (p + r) % 2
            image = blob_or_ring(label, rng)
            rows.append(
                {
                    "patient_id": f"P{p:02d}",
                    "nodule_id": f"P{p:02d}-N{r}",
                    "label": np.int8(label),
                    "image": image.reshape(-1),
                    "malignancy": 4.0 + label if label else 1.5,
                    "texture": 5 if label else 2,
                }
            )
    return pd.DataFrame(rows)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_report_json_has_every_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rois = tmp_path / "rois.parquet"
    write_roi_table(_separable_table(), rois)
    out = tmp_path / "report"
    code = main(["evaluate-rois", str(rois), "--out", str(out), "--quick", "--epochs", "20"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "codes alone (flat Hamming) MAP@10" in printed and "best baseline" in printed
    report = json.loads((out / "evaluation.json").read_text())
    for key in (
        "split_mode",
        "n_queries",
        "n_database",
        "bits",
        "recipe",
        "ours",
        "objectives",
        "baselines",
        "ablation",
        "leakage",
        "ndcg_at_10",
        "bits_sweep",
        "reader_agreement",
    ):
        assert key in report, key
    assert report["reader_agreement"] is None and NO_READER_AGREEMENT in printed
    assert "deployed" not in report  # a table has no deployed model: ours is retrained
    assert report["split_mode"] == "patient" and report["n_queries"] + report["n_database"] == 14 * 8
    assert report["recipe"]["epochs"] == 20 and report["recipe"]["pairwise_weight"] > 0
    assert METHOD_FIELDS | CLASSIFIER_FIELDS | {"code_health", "ndcg_at_10"} <= set(report["ours"])
    assert set(report["ours"]["map_at_k"]) == {"5", "10", "20", "50", "100"}
    assert len(report["ours"]["spread"]["map_at_10"]["values"]) == 3
    # the table has ratings (malignancy, texture): the study shows what the rating terms add
    assert set(report["objectives"]) == {PAPER_OBJECTIVE, PAPER_RECIPE, WITHOUT_RATINGS}
    objectives = [PAPER_OBJECTIVE, PAPER_RECIPE, WITHOUT_RATINGS]
    for name in [*"LSH SH BRE ITQ MLH KSH CNNH DLBHC DNNH DPSH".split(), RAW_KNN, *objectives]:
        assert METHOD_FIELDS <= set({**report["baselines"], **report["objectives"]}[name]), name
    for name in ("LSH", "ITQ", "DPSH", PAPER_OBJECTIVE):
        health = {**report["baselines"], **report["objectives"]}[name]["code_health"]
        assert set(health) >= {"distinct_codes", "mean_bit_entropy", "constant_bits", "intra_class_hamming"}
    for name in ("SVM", "ELM"):
        assert CLASSIFIER_FIELDS <= set(report["baselines"][name]), name
    assert set(report["ablation"]) == {"hamming", "rerank", "hierarchical"}
    leakage = report["leakage"]
    assert leakage["seeds"] == 3 and len(leakage["roi"]["map_at_10"]["values"]) == 3
    for key in ("accuracy", "p_at_10", "map_at_10"):
        inflation = leakage["inflation"][key]
        assert inflation["low"] <= inflation["difference"] <= inflation["high"]
        difference = leakage["roi"][key]["mean"] - leakage["patient"][key]["mean"]
        assert inflation["difference"] == pytest.approx(difference)
    assert set(leakage["raw_knn"]) == {"patient", "roi", "p_at_10", "map_at_10"}
    assert set(report["bits_sweep"]) == {"32", "256"}
    assert 0.0 <= report["ndcg_at_10"] <= 1.0
    # separable data: codes and classifier both find the classes even in this short run
    assert report["baselines"]["ITQ"]["map_at_k"]["10"] > 0.6
    assert report["ours"]["accuracy"] > 0.9 and report["ablation"]["hamming"]["map_at_k"]["10"] > 0.9
    for name in ("evaluation.md", "map_at_k.png", "examples.png"):
        assert (out / name).stat().st_size > 0
    markdown = (out / "evaluation.md").read_text()
    assert "| Ours (hierarchical) |" in markdown and "### Code health" in markdown
    assert "trained from scratch on the training split" in markdown and "## Leakage" in markdown
    # too few training patients to hold any out: the report says validation did not run
    assert report["study_validation"].startswith("skipped: ") and "fewer than 50" in report["study_validation"]
    assert f"validation {report['study_validation']}" in markdown


def test_the_deployed_model_is_the_headline(tmp_path: Path) -> None:
    """The deployed model and index searched through NoduleSearcher, no method retrained: the
    accuracy is the card's, and it is what the searcher's own predictions give. The comparison
    study on the same table retrains the deployed network under its recipe."""
    table = assign_split(_separable_table(), seed=0)
    # readers: three agree on even nodules, only two marked odd ones (not counted)
    table["reader_malignancy"] = [[5, 4, 5, 0] if r % 2 == 0 else [5, 4, 0, 0] for r in range(len(table))]
    train = table[table["split"] == "train"]
    test = table[table["split"] == "test"].reset_index(drop=True)
    model = train_hash_model(
        roi_images(train),
        train["label"].to_numpy(),
        train["patient_id"].to_numpy(),
        NetworkConfig(bits=32, lstm_hidden=16, attention_dim=16, fc_dim=64),
        TrainConfig(epochs=6, num_threads=1),
    )
    encoded = encode(model, roi_images(train))
    items = train.drop(columns=["image"]).reset_index(drop=True)
    index = build_index(encoded.codes, encoded.fc, train["label"].to_numpy(), items, "m1", rois=roi_images(train))
    card_accuracy = classification_metrics(test["label"].to_numpy(), encode(model, roi_images(test)).predicted)
    deployed = Deployed(NoduleSearcher(model, index, "m1"), {"test_metrics": card_accuracy, "selected_epoch": 6})
    evaluation = evaluate_model(table, deployed)
    report = evaluation.report
    assert "ours" not in report and "baselines" not in report  # nothing retrained
    headline = report["deployed"]
    assert headline["model_version"] == "m1" and headline["index_version"] == index.index_version
    assert headline["accuracy"] == card_accuracy["accuracy"] == headline["accuracy_as_searched"]
    assert set(headline["modes"]) == {"hamming", "rerank", "hierarchical"}
    assert headline["code_health"]["items"] == len(index)
    assert headline["unit"] == "nodule" and headline["n_database_nodules"] == index.items["nodule_id"].nunique()
    markdown = render_markdown(report)
    assert "each hit a distinct nodule" in markdown and "| TREC MAP@10 |" in markdown
    assert "## Comparison study" not in markdown
    # both APs for every search mode: the textbook one never above the pinned one (its
    # denominator min(k, relevant) is at least the relevant items retrieved)
    for metrics in headline["modes"].values():
        assert 0 <= metrics["trec_map_at_k"]["10"] <= metrics["map_at_k"]["10"]
    assert 0 < headline["modes"]["hierarchical"]["ndcg_at_10_within_class"] <= 1
    # the rankings are the searcher's, query by query
    for q in (0, len(test) - 1):
        hits = deployed.searcher.search_roi(roi_images(test)[q], k=10, exclude_patient=test["patient_id"].iloc[q]).hits
        assert [h.row for h in hits] == evaluation.example_rankings[q][: len(hits)].tolist()
    agreement = report["reader_agreement"]
    counted = np.array([len([r for r in ratings if r]) >= 3 for ratings in test["reader_malignancy"]])
    predicted = encode(model, roi_images(test)).predicted
    assert agreement["agreement"] == 1.0 and agreement["rows"] == counted.sum() == agreement["nodules"]
    assert agreement["model_accuracy"] == {
        "deployed model": pytest.approx(float((predicted[counted] == test["label"].to_numpy()[counted]).mean()))
    }
    files = write_report(evaluation, tmp_path)
    assert "map_at_k" not in files and files["examples"].stat().st_size > 0  # one method: no MAP@k curves
    markdown = (tmp_path / "evaluation.md").read_text()
    assert "## Deployed model (the headline)" in markdown and "## How often the readers agree" in markdown

    config = replace(
        EvaluationConfig.quick(epochs=2, seeds=1), hashing_baselines=(), classifier_baselines=(), bits_sweep=()
    )
    study = evaluate(table, config, recipe=model.config, network=model.network).report
    assert "deployed" not in study and study["network"]["lstm_hidden"] == 16  # the deployed network retrained
    for metrics in (study["ours"], *study["objectives"].values()):
        assert 0 <= metrics["trec_map_at_k"]["10"] <= metrics["map_at_k"]["10"]
        assert 0 < metrics["ndcg_at_10_within_class"] <= 1
    assert len(study["ours"]["spread"]["ndcg_at_10_within_class"]["values"]) == 1
    assert set(study["reader_agreement"]["model_accuracy"]) == {"ours (study, seed 0)"}


def test_the_short_study_runs_every_method_once() -> None:
    """``make demo``'s study: one seed, the one hash size, no leakage study, every method still."""
    config = EvaluationConfig.profile("short")
    assert (config.seeds, config.bits_sweep, config.leakage, config.epochs) == (1, (), False, 12)
    assert config.hashing_baselines == EvaluationConfig().hashing_baselines
    assert config.classifier_baselines == EvaluationConfig().classifier_baselines
    report = evaluate(
        _separable_table(), replace(config, epochs=2, hashing_baselines=(), classifier_baselines=())
    ).report
    assert report["leakage"] is None and report["bits_sweep"] == {}
    assert len(report["ours"]["spread"]["map_at_10"]["values"]) == 1
    markdown = render_markdown(report)
    assert "### Hash bits" not in markdown and "## Leakage" not in markdown and "### Spread of ours" in markdown


def test_the_rows_order_of_a_table_does_not_change_the_evaluation() -> None:
    """evaluate-rois on the same table with its rows shuffled: same model, same ranked nodules."""
    table = _separable_table(patients=12, per_patient=6)
    config = replace(
        EvaluationConfig.quick(epochs=2, seeds=1),
        hashing_baselines=(),
        classifier_baselines=(),
        bits_sweep=(),
        leakage=False,
    )
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    network = NetworkConfig(bits=32, lstm_hidden=16, attention_dim=16, fc_dim=64)
    first, second = (evaluate(t, config, network=network) for t in (table, shuffled))
    ranked = [e.query_rows["nodule_id"].to_numpy()[:, None] for e in (first, second)]
    hits = [e.database_rows["nodule_id"].to_numpy()[e.example_rankings] for e in (first, second)]
    by_query = [dict(zip(q[:, 0], h.tolist())) for q, h in zip(ranked, hits)]
    assert by_query[0] == by_query[1]
    assert first.report["ours"]["map_at_k"] == second.report["ours"]["map_at_k"]
    assert first.report["baselines"][RAW_KNN]["map_at_k"] == second.report["baselines"][RAW_KNN]["map_at_k"]


def test_rank_by_hamming_settles_ties_by_nodule_id_not_row() -> None:
    database = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)
    items = pd.DataFrame({"nodule_id": ["n-c", "n-b", "n-a"]})
    query = np.zeros((1, 8), dtype=bool)
    assert rank_by_hamming(query, database, stable_keys(items), 5).tolist() == [[1, 2, 0, -1, -1]]
    reversed_rows = rank_by_hamming(query, database[::-1], stable_keys(items.iloc[::-1]), 5)
    assert items["nodule_id"].to_numpy()[::-1][reversed_rows[0, :3]].tolist() == ["n-b", "n-a", "n-c"]


def test_a_within_class_ranking_ranks_only_the_allowed_items() -> None:
    database = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=bool)
    keys = stable_keys(pd.DataFrame({"nodule_id": ["n-a", "n-b", "n-c"]}))
    query = np.zeros((1, 8), dtype=bool)
    # the nearest item (row 1, Hamming 0) is of another label: the within-class ranking skips it
    # and pads where the query's class runs out
    allowed = np.array([[True, False, True]])
    assert rank_by_hamming(query, database, keys, 3, allowed).tolist() == [[0, 2, -1]]
    assert rank_by_hamming(query, database, keys, 3).tolist() == [[1, 0, 2]]


def test_within_class_ndcg_scores_the_order_inside_the_label() -> None:
    """A benign query against one malignant and two benign items, described by their ratings: a
    ranking that puts the malignant item first loses gated nDCG, while its order inside the
    benign class decides the within-class figure."""
    queries = pd.DataFrame({"label": [0], "malignancy": [1.0], "texture": [5.0]})
    database = pd.DataFrame({"label": [1, 0, 0], "malignancy": [5.0, 1.0, 2.0], "texture": [5.0, 5.0, 1.0]})
    gated, within = np.array([[0, 2, 1]]), np.array([[1, 2, -1]])
    metrics = ranking_metrics(gated, queries, database, (1, 2), within_class_rows=within)
    assert metrics["ndcg_at_10_within_class"] == pytest.approx(1.0)  # the closer benign item first
    assert metrics["ndcg_at_10"] < metrics["ndcg_at_10_within_class"]
    worse = ranking_metrics(gated, queries, database, (1, 2), within_class_rows=np.array([[2, 1, -1]]))
    assert worse["ndcg_at_10_within_class"] < 1.0
    assert "ndcg_at_10_within_class" not in ranking_metrics(gated, queries, database, (1, 2))


def test_a_table_without_both_classes_in_training_is_refused() -> None:
    table = _separable_table(patients=2)
    table["label"] = np.int8(1)
    with pytest.raises(NotEnoughData):
        evaluate(table, EvaluationConfig.quick())
