"""The evaluation report: every field of the JSON shape other tools read, written by the
``evaluate-rois`` CLI from any ROI table, on separable generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.cli import main
from nodule_pipeline.hashing.evaluation import EvaluationConfig, NotEnoughData, evaluate
from nodule_pipeline.hashing.search import rank_by_hamming, stable_keys
from nodule_pipeline.roi_table import write_roi_table

METHOD_FIELDS = {"map_at_k", "p_at_10", "precision_at_10", "recall_at_10", "f1_at_10"}
CLASSIFIER_FIELDS = {"accuracy", "recall", "f1"}


def _separable_table(patients: int = 14, per_patient: int = 8, seed: int = 0) -> pd.DataFrame:
    """Solid bright blobs (malignant) against faint rings (benign), in HU, with ratings."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    radius = np.hypot(yy - 16, xx - 16)
    rows = []
    for p in range(patients):
        for r in range(per_patient):
            label = (p + r) % 2
            image = np.full((32, 32), -850.0) + rng.normal(0, 30, (32, 32))
            if label:
                image[radius < rng.uniform(5, 8)] = 40
            else:
                image[(radius > 6) & (radius < 8)] = -400
            rows.append(
                {
                    "patient_id": f"P{p:02d}",
                    "nodule_id": f"P{p:02d}-N{r}",
                    "label": np.int8(label),
                    "image": image.astype(np.float32).reshape(-1),
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
    code = main(["evaluate-rois", str(rois), "--out", str(out), "--quick", "--epochs", "2"])
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "evaluation.json").read_text())
    for key in (
        "split_mode",
        "n_queries",
        "n_database",
        "bits",
        "ours",
        "baselines",
        "ablation",
        "leakage",
        "ndcg_at_10",
        "bits_sweep",
    ):
        assert key in report, key
    assert report["split_mode"] == "patient" and report["n_queries"] + report["n_database"] == 14 * 8
    assert METHOD_FIELDS | CLASSIFIER_FIELDS <= set(report["ours"])
    assert set(report["ours"]["map_at_k"]) == {"5", "10", "20", "50", "100"}
    for name in ("LSH", "SH", "ITQ", "KSH", "DLBHC", "DPSH", "CNN", "BiLSTM", "CNN+AM", "BiLSTM+AM"):
        assert METHOD_FIELDS <= set(report["baselines"][name]), name
    for name in ("SVM", "ELM"):
        assert CLASSIFIER_FIELDS <= set(report["baselines"][name]), name
    assert set(report["ablation"]) == {"hamming", "rerank", "hierarchical"}
    assert set(report["leakage"]) >= {"patient", "roi", "inflation"}
    assert set(report["bits_sweep"]) == {"32", "256"}
    assert 0.0 <= report["ndcg_at_10"] <= 1.0
    # separable data: a shallow hash beats the class prior clearly even in this short run (the deep
    # model's learning is tested in test_hashing_network with enough steps)
    assert report["baselines"]["ITQ"]["map_at_k"]["10"] > 0.6
    assert all(0.0 <= value <= 1.0 for value in report["ours"]["map_at_k"].values())
    for name in ("evaluation.md", "map_at_k.png", "examples.png"):
        assert (out / name).stat().st_size > 0
    assert "| Ours (hierarchical) |" in (out / "evaluation.md").read_text()


def test_rank_by_hamming_settles_ties_by_nodule_id_not_row() -> None:
    database = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)
    items = pd.DataFrame({"nodule_id": ["n-c", "n-b", "n-a"]})
    query = np.zeros((1, 8), dtype=bool)
    assert rank_by_hamming(query, database, stable_keys(items), 5).tolist() == [[1, 2, 0, -1, -1]]
    reversed_rows = rank_by_hamming(query, database[::-1], stable_keys(items.iloc[::-1]), 5)
    assert items["nodule_id"].to_numpy()[::-1][reversed_rows[0, :3]].tolist() == ["n-b", "n-a", "n-c"]


def test_a_table_without_both_classes_in_training_is_refused() -> None:
    table = _separable_table(patients=2)
    table["label"] = np.int8(1)
    with pytest.raises(NotEnoughData):
        evaluate(table, EvaluationConfig.quick())
