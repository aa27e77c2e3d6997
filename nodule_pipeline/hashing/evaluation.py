"""The evaluation behind the report: the paper's tables and figures with an honest protocol.

Every method sees the same split and the same ROIs: queries are the test rows, the database is
the training rows, relevance is the same ground-truth label (DESIGN.md section 6). Ours is the
paper's network with hierarchical search, over several seeds; the paper's Table 2 variants are
configurations of the same network; shallow and deep hashing baselines rank the database by
Hamming distance (ties by nodule id). Leakage: the same model trained and evaluated on the
paper's random ROI split, beside the patient split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from nodule_pipeline.hashing.baselines import (
    CLASSIFIER_BASELINES,
    DISPLAY_NAMES,
    HASHING_BASELINES,
    fit_classifier_baseline,
    fit_hashing_baseline,
)
from nodule_pipeline.hashing.codes import pack_codes
from nodule_pipeline.hashing.index import build_index
from nodule_pipeline.hashing.metrics import (
    bootstrap_interval,
    mean_std,
    ndcg_at_k,
    per_query_metrics,
    ranked_relevance,
    ratings_matrix,
    relevant_counts,
    retrieval_metrics,
)
from nodule_pipeline.hashing.network import VARIANTS, NetworkConfig
from nodule_pipeline.hashing.search import rank_by_hamming, search_batch, stable_keys
from nodule_pipeline.hashing.training import Encoded, TrainConfig, classification_metrics, encode, train_hash_model
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, assign_split, roi_images

SEARCH_MODES = ("hamming", "rerank", "hierarchical")


class NotEnoughData(ValueError):
    """The table cannot support an evaluation (a class missing from training, no test rows)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """What the report runs. The defaults are the full report; :meth:`quick` is the test-size one."""

    bits: int = 256
    epochs: int = 25
    seeds: int = 3
    bits_sweep: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    variants: tuple[str, ...] = tuple(name for name in VARIANTS if name != "ours")
    hashing_baselines: tuple[str, ...] = tuple(HASHING_BASELINES)
    classifier_baselines: tuple[str, ...] = tuple(CLASSIFIER_BASELINES)
    baseline_epochs: int = 15
    ks: tuple[int, ...] = (5, 10, 20, 50, 100)
    leakage: bool = True
    split_seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> EvaluationConfig:
        """Few epochs, two bit sizes, one seed: the whole chain in minutes, for tests and demos."""
        return replace(cls(epochs=3, seeds=1, bits_sweep=(32, 256), baseline_epochs=3), **overrides)

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> EvaluationConfig:
        """``full`` or ``quick``, with the overrides that are not None (CLI and asset options)."""
        base = cls.quick() if name == "quick" else cls()
        return replace(base, **{key: value for key, value in overrides.items() if value is not None})


@dataclass
class Evaluation:
    """The report's numbers (``report``, JSON-ready) and what pictures need (rankings, images)."""

    report: dict[str, Any]
    example_rankings: np.ndarray  # (queries, k) database rows of ours, hierarchical, seed 0
    query_rows: pd.DataFrame = field(repr=False)
    database_rows: pd.DataFrame = field(repr=False)


def _split(table: pd.DataFrame, mode: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if SPLIT_COLUMN not in table.columns or mode == "roi":
        table = assign_split(table, mode=mode, seed=seed)
    train = table[table[SPLIT_COLUMN] == TRAIN].reset_index(drop=True)
    test = table[table[SPLIT_COLUMN] == TEST].reset_index(drop=True)
    if len(train) < 2 or len(test) < 1 or train["label"].nunique() < 2:
        raise NotEnoughData(
            f"the split leaves {len(train)} training ROIs ({train['label'].nunique()} classes) and {len(test)} test "
            "ROIs; evaluation needs both classes in training and at least one test ROI"
        )
    return train, test


def _retrieval(ranked_rows: np.ndarray, test: pd.DataFrame, train: pd.DataFrame, ks: tuple[int, ...]) -> dict:
    query_labels, db_labels = test["label"].to_numpy(), train["label"].to_numpy()
    relevance = ranked_relevance(query_labels, db_labels, ranked_rows)
    return retrieval_metrics(relevance, relevant_counts(query_labels, db_labels), ks=ks)


class _Runner:
    """Trains and scores the network configurations the report needs, on one split."""

    def __init__(self, train: pd.DataFrame, test: pd.DataFrame, config: EvaluationConfig, log: Callable[[str], None]):
        self.train, self.test, self.config, self.log = train, test, config, log
        self.train_images, self.test_images = roi_images(train), roi_images(test)
        self.k_max = max(config.ks)

    def fit(self, variant: str, bits: int, seed: int) -> tuple[Encoded, Encoded]:
        self.log(f"training {variant}, {bits} bits, seed {seed}, {self.config.epochs} epochs")
        model = train_hash_model(
            self.train_images,
            self.train["label"].to_numpy(),
            self.train["patient_id"].to_numpy(),
            NetworkConfig(bits=bits, variant=variant),
            TrainConfig(epochs=self.config.epochs, seed=seed),
        )
        return encode(model, self.train_images), encode(model, self.test_images)

    def score(self, database: Encoded, queries: Encoded, mode: str = "hierarchical") -> tuple[dict, np.ndarray]:
        """Classification of the queries plus retrieval in one search mode."""
        items = self.train[["patient_id", "nodule_id"]]
        index = build_index(database.codes, database.fc, self.train["label"].to_numpy(), items, "evaluation")
        result = search_batch(index, pack_codes(queries.codes), queries.fc, queries.predicted, k=self.k_max, mode=mode)
        metrics = _retrieval(result.rows, self.test, self.train, self.config.ks)
        classified = classification_metrics(self.test["label"].to_numpy(), queries.predicted)
        metrics.update({name: classified[name] for name in ("accuracy", "recall", "f1", "precision")})
        return metrics, result.rows


def _spread(per_seed: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    spread = {}
    for key in keys:
        values = [run[key] for run in per_seed]
        mean, std = mean_std(values)
        spread[key] = {"mean": mean, "std": std, "values": values}
    return spread


def evaluate(
    table: pd.DataFrame,
    config: EvaluationConfig = EvaluationConfig(),
    split_mode: str = "patient",
    log: Callable[[str], None] = lambda _: None,
) -> Evaluation:
    """Run the whole comparison on a ROI table (with a ``split`` column, or split by patient here)."""
    train, test = _split(table, split_mode, config.split_seed)
    runner = _Runner(train, test, config, log)
    ks = config.ks

    # Ours: the paper's network, hierarchical search, over seeds.
    per_seed, first = [], None
    for seed in range(config.seeds):
        database, queries = runner.fit("ours", config.bits, seed)
        metrics, rows = runner.score(database, queries)
        per_seed.append(metrics)
        if first is None:
            first = (database, queries, rows)
    database, queries, ours_rows = first
    ours = dict(per_seed[0])
    spread_keys = ("accuracy", "recall", "f1", "p_at_10")
    ours["spread"] = _spread(per_seed, spread_keys)
    ours["spread"]["map_at_10"] = _spread([{"m": run["map_at_k"]["10"]} for run in per_seed], ("m",))["m"]
    relevance = ranked_relevance(test["label"].to_numpy(), train["label"].to_numpy(), ours_rows)
    ap10 = per_query_metrics(relevance, relevant_counts(test["label"].to_numpy(), train["label"].to_numpy()), 10)["ap"]
    ours["map_at_10_bootstrap_95"] = list(bootstrap_interval(ap10))
    log("ours: ablation of the search stages")
    ablation = {mode: runner.score(database, queries, mode)[0] for mode in SEARCH_MODES}
    has_ratings = all(column in table.columns for column in ("malignancy", "texture"))
    _, ndcg = ndcg_at_k(
        ratings_matrix(test) if has_ratings else None,
        ratings_matrix(train) if has_ratings else None,
        test["label"].to_numpy(),
        train["label"].to_numpy(),
        ours_rows,
        k=10,
    )

    baselines: dict[str, dict] = {}
    for variant in config.variants:
        variant_database, variant_queries = runner.fit(variant, config.bits, 0)
        baselines[VARIANTS[variant]] = runner.score(variant_database, variant_queries)[0]
    for name in config.hashing_baselines:
        log(f"baseline {DISPLAY_NAMES[name]}")
        model = fit_hashing_baseline(
            name, runner.train_images, train["label"].to_numpy(), config.bits, 0, epochs=config.baseline_epochs
        )
        ranked = rank_by_hamming(
            model.encode(runner.test_images), model.encode(runner.train_images), stable_keys(train), runner.k_max
        )
        baselines[DISPLAY_NAMES[name]] = _retrieval(ranked, test, train, ks)
    for name in config.classifier_baselines:
        log(f"baseline {DISPLAY_NAMES[name]}")
        model = fit_classifier_baseline(name, runner.train_images, train["label"].to_numpy(), 0)
        classified = classification_metrics(test["label"].to_numpy(), model.predict(runner.test_images))
        baselines[DISPLAY_NAMES[name]] = {
            name_: classified[name_] for name_ in ("accuracy", "recall", "f1", "precision")
        }

    bits_sweep = {}
    for bits in config.bits_sweep:
        if bits == config.bits:
            metrics = per_seed[0]
        else:
            metrics = runner.score(*runner.fit("ours", bits, 0))[0]
        bits_sweep[str(bits)] = {key: metrics[key] for key in ("accuracy", "recall", "f1")} | {
            "map_at_10": metrics["map_at_k"]["10"]
        }

    leakage = None
    if config.leakage and split_mode == "patient":
        log("leakage: the same model on the paper's random ROI split")
        roi_train, roi_test = _split(table.drop(columns=[SPLIT_COLUMN], errors="ignore"), "roi", config.split_seed)
        roi_runner = _Runner(roi_train, roi_test, config, log)
        roi_metrics = roi_runner.score(*roi_runner.fit("ours", config.bits, 0))[0]
        keys = ("accuracy", "f1", "p_at_10")
        patient_view = {key: per_seed[0][key] for key in keys} | {"map_at_10": per_seed[0]["map_at_k"]["10"]}
        roi_view = {key: roi_metrics[key] for key in keys} | {"map_at_10": roi_metrics["map_at_k"]["10"]}
        leakage = {
            "patient": patient_view,
            "roi": roi_view,
            "inflation": {key: roi_view[key] - patient_view[key] for key in patient_view},
            "roi_patients_on_both_sides": len(set(roi_train["patient_id"]) & set(roi_test["patient_id"])),
        }

    report = {
        "split_mode": split_mode,
        "n_queries": len(test),
        "n_database": len(train),
        "bits": config.bits,
        "ours": ours,
        "baselines": baselines,
        "ablation": ablation,
        "leakage": leakage,
        "ndcg_at_10": ndcg,
        "bits_sweep": bits_sweep,
        "config": asdict(config),
    }
    return Evaluation(report, ours_rows[:, :10], test, train)
