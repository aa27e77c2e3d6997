"""How often the readers' label and our model agree with what nodules really were (TCIA's
diagnosis sheet), and how well a search by our codes finds nodules of the same diagnosis.

The sheet matches few nodules (tens on LIDC's 1,000 patients), so every matched nodule is scored
by a model that never saw its patient: patient-level folds over the matched patients, each fold's
model trained on every other patient of the table. The intervals are Wilson 95% intervals: with
n near 30 they are some 30 points wide, so the section can show a gross failure or a gross
difference from the readers, not a point of accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from nodule_pipeline.hashing.index import build_index
from nodule_pipeline.hashing.metrics import table_ratings
from nodule_pipeline.hashing.network import NetworkConfig
from nodule_pipeline.hashing.search import search_batch
from nodule_pipeline.hashing.training import TrainConfig, encode, train_hash_model
from nodule_pipeline.lidc.diagnosis import MATCHING_RULE, match_diagnoses
from nodule_pipeline.roi_table import roi_images

FOLDS = 5
RETRIEVAL_K = 10
SMALL_NUMBERS = (
    "A confirmed diagnosis is known for few nodules, so these figures carry intervals some 30 points "
    "wide at n near 30: they can show a gross failure, or a gross difference between the model and "
    "the readers, not a point of accuracy. Malignant = primary lung cancer or metastatic."
)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sound at small n, unlike the normal one)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def agreement(agrees: np.ndarray) -> dict[str, Any]:
    agrees = np.asarray(agrees, dtype=bool)
    low, high = wilson(int(agrees.sum()), len(agrees))
    return {
        "agreement": float(agrees.mean()) if len(agrees) else float("nan"),
        "low": low,
        "high": high,
        "n": len(agrees),
    }


def pathology(
    table: pd.DataFrame,
    sheet: pd.DataFrame,
    recipe: TrainConfig,
    network: NetworkConfig,
    folds: int = FOLDS,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The report's ``pathology`` section for a ROI table and the diagnosis sheet's table."""
    nodules = table.drop_duplicates("nodule_id")[["patient_id", "nodule_id"]].astype(str).reset_index(drop=True)
    matches, summary = match_diagnoses(nodules, sheet)
    matched = matches[matches["diagnosis_level"].notna()].reset_index(drop=True)
    section: dict[str, Any] = {
        "rule": MATCHING_RULE,
        "matched_patients": int(matched["patient_id"].nunique()),
        "matched_nodules": len(matched),
        "by_level": summary["nodules_by_level"],
        "diagnoses": summary["diagnoses"],
        "note": SMALL_NUMBERS,
    }
    if len(matched) < 2:
        return section | {"skipped": f"{len(matched)} nodule(s) matched: nothing to score"}
    truth = (matched["diagnosis"] != "benign").to_numpy()
    rows_of = {nodule: rows for nodule, rows in table.reset_index(drop=True).groupby("nodule_id").groups.items()}
    labels = table["label"].to_numpy()
    readers = np.array([np.median(labels[rows_of[nodule]]) >= 0.5 for nodule in matched["nodule_id"]])
    section["readers"] = agreement(readers == truth)

    ours = np.zeros(len(matched), dtype=bool)
    precision: list[float] = []
    patients = np.random.default_rng(seed).permutation(matched["patient_id"].unique())
    groups = np.array_split(patients, min(folds, len(patients)))
    images = roi_images(table)
    ratings = table_ratings(table)
    first_rows = np.array([rows_of[nodule][0] for nodule in matched["nodule_id"]])
    for number, held_out in enumerate(groups, start=1):
        training = ~table["patient_id"].astype(str).isin(held_out).to_numpy()
        log(f"pathology: fold {number}/{len(groups)}, {len(held_out)} patient(s) held out")
        model = train_hash_model(
            images[training],
            labels[training],
            table["patient_id"].to_numpy()[training],
            network,
            recipe,
            ratings=None if ratings is None else ratings[training],
        )
        in_fold = matched["patient_id"].isin(held_out).to_numpy()
        for position in np.flatnonzero(in_fold):  # a nodule's call: the mean of its rows' p(malignant)
            encoded_rows = encode(model, images[rows_of[matched["nodule_id"][position]]])
            ours[position] = encoded_rows.probs[:, 1].mean() >= 0.5
        precision += _fold_precision(model, images[first_rows], truth, matched["patient_id"].to_numpy(), in_fold)
    section["ours"] = agreement(ours == truth)
    section["retrieval"] = {
        "p_at_10": float(np.mean(precision)) if precision else float("nan"),
        "n_queries": len(precision),
        "relevance": "same confirmed diagnosis (benign / malignant), among the other patients' matched nodules",
    }
    section["folds"] = len(groups)
    return section


def _fold_precision(model, images: np.ndarray, truth: np.ndarray, patients: np.ndarray, queries: np.ndarray):
    """P@10 of the fold's held-out matched nodules searched among the other patients' matched ones."""
    encoded = encode(model, images)
    items = pd.DataFrame({"patient_id": patients.astype(str), "nodule_id": np.arange(len(images)).astype(str)})
    index = build_index(encoded.codes, encoded.fc, truth.astype(int), items, "pathology")
    rows = np.flatnonzero(queries)
    result = search_batch(
        index,
        encoded.codes[rows],
        encoded.fc[rows],
        None,
        k=RETRIEVAL_K,
        mode="rerank",
        exclude_patients=patients[rows].astype(str).tolist(),
    )
    scores = []
    for query, ranked in zip(rows, result.rows):
        found = ranked[ranked >= 0]
        if len(found):
            scores.append(float((truth[found] == truth[query]).mean()))
    return scores
