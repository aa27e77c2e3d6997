"""The evaluation behind the reports, in two parts, and a reference for both.

1. **The deployed model** (:func:`evaluate_model`, ``retrieval_evaluation``): the ``hash_model``
   asset queried through its ``hash_index`` with
   :class:`~nodule_pipeline.hashing.searcher.NoduleSearcher`, the search code users call, the test
   split as queries. Its accuracy is the model card's. Nothing is retrained.
2. **The comparison study** (:func:`evaluate`, ``comparison_study`` and ``evaluate-rois``):
   every method retrained from scratch on the training split under the same recipe as the
   deployed model: ours over seeds; the paper's cross-entropy-only objective and the paper's
   whole recipe; the network variants of the paper's Table 2; shallow and deep hashing
   baselines; SVM and ELM; a raw-pixel Euclidean kNN; hash sizes; and the leak of the paper's
   random ROI split, with seeds on both splits.

Beside them, the readers' own agreement on the test nodules
(:func:`~nodule_pipeline.hashing.metrics.reader_agreement`) with each model's accuracy on the
same rows: how good a model can look against labels that are readers' medians.

Relevance is the same ground-truth label; queries are the test rows, the database the training
rows; metrics as DESIGN.md section 6 pins them. Every ranking settles equal distances by nodule
id, never by row order.
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
from nodule_pipeline.hashing.codes import code_health, unpack_codes
from nodule_pipeline.hashing.index import build_index
from nodule_pipeline.hashing.metrics import (
    RATING_NAMES,
    bootstrap_interval,
    difference_interval,
    mean_std,
    ndcg_at_k,
    per_query_metrics,
    ranked_relevance,
    reader_agreement,
    relevant_counts,
    retrieval_metrics,
    table_ratings,
)
from nodule_pipeline.hashing.network import VARIANTS, NetworkConfig, normalise_rois
from nodule_pipeline.hashing.pathology import pathology
from nodule_pipeline.hashing.search import rank_by_distance, rank_by_hamming, search_batch, stable_keys
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.hashing.training import (
    Encoded,
    TrainConfig,
    classification_metrics,
    encode,
    train_hash_model,
    validation_note,
    validation_rows,
)
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, assign_split, roi_images

SEARCH_MODES = ("hamming", "rerank", "hierarchical")
CLASSIFICATION_KEYS = ("accuracy", "recall", "f1", "precision")
RAW_KNN = "Raw-pixel kNN"
PAPER_OBJECTIVE = "Paper objective (CE only)"
PAPER_RECIPE = "Paper recipe"
WITHOUT_RATINGS = "Ours without the readers' ratings"
LEAKAGE_METRICS = ("accuracy", "p_at_10", "map_at_10")


class NotEnoughData(ValueError):
    """The table cannot support an evaluation (a class missing from training, no test rows)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """What the comparison study runs. The defaults are the full report; :meth:`quick` the
    minutes-long one. ``epochs`` None trains every network for the recipe's epochs."""

    bits: int = 256
    epochs: int | None = None
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
        """12 epochs, three seeds a split, two hash sizes, no Table 2 variants: minutes on a CPU."""
        quick = cls(epochs=12, bits_sweep=(32, 256), variants=(), baseline_epochs=5)
        return replace(quick, **overrides)

    @classmethod
    def short(cls, **overrides: Any) -> EvaluationConfig:
        """:meth:`quick` at one seed, one hash size and no leakage study (which needs seeds on two
        splits): every method still runs once, for ``make demo``."""
        return replace(cls.quick(seeds=1, bits_sweep=(), leakage=False), **overrides)

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> EvaluationConfig:
        """``full``, ``quick`` or ``short``, with the overrides that are not None (CLI and asset options)."""
        base = {"quick": cls.quick, "short": cls.short}.get(name, cls)()
        return replace(base, **{key: value for key, value in overrides.items() if value is not None})


@dataclass
class Evaluation:
    """The report's numbers (``report``, JSON-ready) and what pictures need: the headline's
    rankings of the queries (rows of ``database_rows``, which holds an ``image`` column)."""

    report: dict[str, Any]
    example_rankings: np.ndarray
    query_rows: pd.DataFrame = field(repr=False)
    database_rows: pd.DataFrame = field(repr=False)


@dataclass
class Deployed:
    """The model and index users search, and the model's card (its test metrics)."""

    searcher: NoduleSearcher
    card: dict[str, Any]


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


def ranking_metrics(
    ranked_rows: np.ndarray,
    queries: pd.DataFrame,
    database: pd.DataFrame,
    ks: tuple[int, ...],
    relevant_in_db: np.ndarray | None = None,
    within_class_rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """MAP@k, P@k, R@k, F1@k and graded nDCG@10 of a ranking (rows of ``database`` per query),
    and ``ndcg_at_10_within_class`` of ``within_class_rows``: the same method ranking only the
    database items of each query's true label, so that figure measures the order by appearance
    alone, not the class gate."""
    query_labels, db_labels = queries["label"].to_numpy(), database["label"].to_numpy()
    relevance = ranked_relevance(query_labels, db_labels, ranked_rows)
    counts = relevant_counts(query_labels, db_labels) if relevant_in_db is None else relevant_in_db
    metrics = retrieval_metrics(relevance, counts, ks=ks)
    query_ratings, database_ratings = table_ratings(queries), table_ratings(database)
    for key, rows in (("ndcg_at_10", ranked_rows), ("ndcg_at_10_within_class", within_class_rows)):
        if rows is not None:
            _, metrics[key] = ndcg_at_k(query_ratings, database_ratings, query_labels, db_labels, rows, k=10)
    return metrics


def _same_label(queries: pd.DataFrame, database: pd.DataFrame) -> np.ndarray:
    """(q, n): the database items of each query's true label (what a within-class ranking may rank)."""
    return queries["label"].to_numpy()[:, None] == database["label"].to_numpy()[None, :]


def _spread(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures the leakage and spread tables compare."""
    return {"accuracy": metrics["accuracy"], "p_at_10": metrics["p_at_10"], "map_at_10": metrics["map_at_k"]["10"]}


class _Study:
    """Trains and scores the network configurations and baselines the study needs, on one split."""

    def __init__(
        self,
        train: pd.DataFrame,
        test: pd.DataFrame,
        config: EvaluationConfig,
        recipe: TrainConfig,
        network: NetworkConfig,
        log: Callable[[str], None],
    ):
        self.train, self.test, self.config, self.log = train, test, config, log
        self.recipe = recipe if config.epochs is None else replace(recipe, epochs=config.epochs)
        self.network = network
        self.train_images, self.test_images = roi_images(train), roi_images(test)
        self.keys = stable_keys(train)
        self.k_max = max(config.ks)

    def fit(
        self, variant: str, bits: int, seed: int, recipe: TrainConfig | None = None, name: str | None = None
    ) -> tuple[Encoded, Encoded, dict[str, Any]]:
        recipe = replace(recipe or self.recipe, seed=seed)
        self.log(f"training {name or VARIANTS[variant]}, {bits} bits, seed {seed}, up to {recipe.epochs} epochs")
        model = train_hash_model(
            self.train_images,
            self.train["label"].to_numpy(),
            self.train["patient_id"].to_numpy(),
            replace(self.network, bits=bits, variant=variant),
            recipe,
            ratings=table_ratings(self.train),
        )
        database = encode(model, self.train_images)
        return database, encode(model, self.test_images), code_health(database.codes, self.train["label"].to_numpy())

    def score(self, database: Encoded, queries: Encoded, mode: str = "hierarchical") -> tuple[dict, np.ndarray]:
        """Classification of the queries plus retrieval in one search mode."""
        items = self.train[[c for c in ("patient_id", "nodule_id", *RATING_NAMES) if c in self.train.columns]]
        index = build_index(database.codes, database.fc, self.train["label"].to_numpy(), items, "evaluation")
        ratings = queries.ratings

        def searched(classes: np.ndarray) -> np.ndarray:
            return search_batch(index, queries.codes, queries.fc, classes, self.k_max, mode, query_ratings=ratings).rows

        rows = searched(queries.predicted)
        within = None
        if mode == "hierarchical":  # the gate at the true class: the pool's order alone
            within = searched(self.test["label"].to_numpy())
        metrics = ranking_metrics(rows, self.test, self.train, self.config.ks, within_class_rows=within)
        classified = classification_metrics(self.test["label"].to_numpy(), queries.predicted)
        metrics.update({name: classified[name] for name in CLASSIFICATION_KEYS})
        return metrics, rows

    def run(
        self, variant: str, bits: int, seed: int, recipe: TrainConfig | None = None, name: str | None = None
    ) -> dict[str, Any]:
        database, queries, health = self.fit(variant, bits, seed, recipe, name)
        return self.score(database, queries)[0] | {"code_health": health}

    def raw_knn(self) -> dict[str, Any]:
        """Euclidean kNN on the normalised pixels: the deterministic reference every learned code must beat."""
        database, stats = normalise_rois(self.train_images)
        queries = normalise_rois(self.test_images, stats)[0]
        database, queries = database.reshape(len(database), -1), queries.reshape(len(queries), -1)
        squared = (queries**2).sum(1)[:, None] - 2 * queries @ database.T + (database**2).sum(1)[None, :]
        squared = np.maximum(squared, 0)
        ranked = rank_by_distance(squared, self.keys, self.k_max)
        within = rank_by_distance(squared, self.keys, self.k_max, _same_label(self.test, self.train))
        return ranking_metrics(ranked, self.test, self.train, self.config.ks, within_class_rows=within)


def evaluate_deployed(
    deployed: Deployed, queries: pd.DataFrame, ks: tuple[int, ...]
) -> tuple[dict, np.ndarray, np.ndarray]:
    """The deployed model and index on the test queries, in each search mode, through
    :meth:`NoduleSearcher.search_many`; a query's own patient is never in its results (it
    matters when the index holds every row). Returns the report part, the hierarchical
    rankings (rows of the index) and the predicted classes."""
    searcher = deployed.searcher
    index = searcher.index
    database = index.items.assign(label=np.asarray(index.labels))
    images = roi_images(queries)
    patients = queries["patient_id"].astype(str).tolist()
    same_patient = database["patient_id"].astype(str).to_numpy()[None, :] == np.asarray(patients)[:, None]
    same_label = queries["label"].to_numpy()[:, None] == database["label"].to_numpy()[None, :]
    # hits are nodules, as users see them: a query has as many relevant items as distinct nodules
    # with an annotation of its label outside its patient
    relevant = np.array([np.unique(searcher.nodule_of_row[wanted]).size for wanted in same_label & ~same_patient])
    modes: dict[str, Any] = {}
    searched = {}
    for mode in SEARCH_MODES:
        searched[mode] = searcher.search_many(images, k=max(ks), mode=mode, exclude_patients=patients)
        within = None
        if mode == "hierarchical":  # the gate at the true class: the order by appearance alone
            labels = queries["label"].to_numpy()
            within = searcher.search_many(images, max(ks), mode, patients, classes=labels)[1].rows
        modes[mode] = ranking_metrics(searched[mode][1].rows, queries, database, ks, relevant, within)
    encoded, hierarchical = searched["hierarchical"]
    rankings, predicted = hierarchical.rows, encoded.predicted
    card_metrics = deployed.card.get("test_metrics") or {}
    classified = classification_metrics(queries["label"].to_numpy(), predicted)
    report = {
        "model_version": searcher.model_version,
        "index_version": index.index_version,
        "n_queries": len(queries),
        "n_database": len(index),
        "n_database_nodules": int(np.unique(searcher.nodule_of_row).size),
        "unit": "nodule",
        "database": index.lineage.get("database", "train"),
        "accuracy": card_metrics.get("accuracy", classified["accuracy"]),
        "accuracy_as_searched": classified["accuracy"],
        **{name: classified[name] for name in ("recall", "f1", "precision")},
        "modes": modes,
        "code_health": code_health(unpack_codes(index.codes, index.bits), index.labels),
        "training": deployed.card.get("training"),
        "selected_epoch": deployed.card.get("selected_epoch"),
    }
    return report, rankings, predicted


def _reader_agreement(test: pd.DataFrame, predictions: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """How often the test nodules' readers agree with each other, beside the models' accuracy on
    the same rows; None when the table carries no readers' ratings or no nodule has enough readers."""
    agreement = reader_agreement(test)
    if agreement is None or not agreement.calls:
        return None
    return agreement.summary(test["label"].to_numpy(), predictions)


def _leakage(
    table: pd.DataFrame,
    study: _Study,
    patient_runs: list[dict[str, Any]],
    bits: int,
    split_seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The same recipe on the paper's random ROI split, with as many seeds as the patient split,
    beside it; the raw-pixel kNN on both splits is the deterministic reference."""
    log("leakage: the same recipe on the paper's random ROI split")
    roi_train, roi_test = _split(table.drop(columns=[SPLIT_COLUMN], errors="ignore"), "roi", split_seed)
    roi_study = _Study(roi_train, roi_test, study.config, study.recipe, study.network, log)
    roi_runs = [roi_study.run("ours", bits, seed, name="ours on the ROI split") for seed in range(len(patient_runs))]
    sides = {"patient": [_headline(run) for run in patient_runs], "roi": [_headline(run) for run in roi_runs]}
    spread = {
        side: {key: _spread([run[key] for run in runs]) for key in LEAKAGE_METRICS} for side, runs in sides.items()
    }
    inflation = {}
    for key in LEAKAGE_METRICS:
        difference, low, high = difference_interval(spread["patient"][key]["values"], spread["roi"][key]["values"])
        inflation[key] = {"difference": difference, "low": low, "high": high}
    knn: dict[str, Any] = {}
    for side, side_study in (("patient", study), ("roi", roi_study)):
        metrics = side_study.raw_knn()
        knn[side] = {"p_at_10": metrics["p_at_10"], "map_at_10": metrics["map_at_k"]["10"]}
    for key in ("p_at_10", "map_at_10"):
        knn[key] = knn["roi"][key] - knn["patient"][key]
    return {
        "seeds": len(patient_runs),
        **spread,
        "inflation": inflation,
        "raw_knn": knn,
        "roi_patients_on_both_sides": len(set(roi_train["patient_id"]) & set(roi_test["patient_id"])),
    }


def evaluate(
    table: pd.DataFrame,
    config: EvaluationConfig = EvaluationConfig(),
    split_mode: str = "patient",
    log: Callable[[str], None] = lambda _: None,
    recipe: TrainConfig | None = None,
    network: NetworkConfig | None = None,
    diagnosis: pd.DataFrame | None = None,
) -> Evaluation:
    """The comparison study on a ROI table (with a ``split`` column, or split by patient here):
    every method trained from scratch on the training split and scored on the test split.

    ``recipe``/``network``: how the study trains (the deployed model's, when there is one; else
    the defaults); ``diagnosis``: TCIA's diagnosis sheet (its table), for the ``pathology`` section.
    """
    recipe = recipe or TrainConfig()
    network = network or NetworkConfig()
    train, test = _split(table, split_mode, config.split_seed)
    study = _Study(train, test, config, recipe, network, log)
    ks = config.ks

    report: dict[str, Any] = {"split_mode": split_mode, "n_queries": len(test), "n_database": len(train)}
    patients, labels = train["patient_id"].to_numpy(), train["label"].to_numpy()
    held_out = validation_rows(patients, labels, recipe.validation_fraction, np.random.default_rng(0))
    report["study_validation"] = validation_note(patients, held_out, recipe.validation_fraction)
    predictions: dict[str, np.ndarray] = {}

    # Ours: the recipe, hierarchical search, over seeds.
    per_seed, first = [], None
    for seed in range(config.seeds):
        database, queries, health = study.fit("ours", config.bits, seed)
        metrics, rows = study.score(database, queries)
        per_seed.append(metrics | {"code_health": health})
        if first is None:
            first = (database, queries, rows)
    database, queries, ours_rows = first
    predictions["ours (study, seed 0)"] = queries.predicted
    ours = dict(per_seed[0])
    ours["spread"] = {
        key: _spread([_headline(run)[key] for run in per_seed]) for key in ("accuracy", "p_at_10", "map_at_10")
    } | {key: _spread([run[key] for run in per_seed]) for key in ("ndcg_at_10", "ndcg_at_10_within_class")}
    relevance = ranked_relevance(test["label"].to_numpy(), train["label"].to_numpy(), ours_rows)
    counts = relevant_counts(test["label"].to_numpy(), train["label"].to_numpy())
    ours["map_at_10_bootstrap_95"] = list(bootstrap_interval(per_query_metrics(relevance, counts, 10)["ap"]))
    log("ours: ablation of the search stages")
    ablation = {mode: study.score(database, queries, mode)[0] for mode in SEARCH_MODES}

    without_ratings = replace(study.recipe, ratings_weight=0, graded_pairwise=False)
    cross_entropy_only = replace(
        without_ratings, pairwise_weight=0, quantization_weight=0, balance_weight=0, decorrelation_weight=0
    )
    paper = TrainConfig.paper(epochs=config.epochs or TrainConfig.paper().epochs)
    objectives = {
        PAPER_OBJECTIVE: study.run("ours", config.bits, 0, cross_entropy_only, PAPER_OBJECTIVE),
        PAPER_RECIPE: study.run("ours", config.bits, 0, paper, PAPER_RECIPE),
    }
    if study.recipe.uses_ratings and table_ratings(train) is not None:  # what the readers' ratings add
        objectives[WITHOUT_RATINGS] = study.run("ours", config.bits, 0, without_ratings, WITHOUT_RATINGS)

    baselines: dict[str, dict] = {}
    for variant in config.variants:
        baselines[VARIANTS[variant]] = study.run(variant, config.bits, 0)
    for name in config.hashing_baselines:
        log(f"baseline {DISPLAY_NAMES[name]}")
        model = fit_hashing_baseline(
            name, study.train_images, train["label"].to_numpy(), config.bits, 0, epochs=config.baseline_epochs
        )
        database_codes, query_codes = model.encode(study.train_images), model.encode(study.test_images)
        ranked = rank_by_hamming(query_codes, database_codes, study.keys, study.k_max)
        within = rank_by_hamming(query_codes, database_codes, study.keys, study.k_max, _same_label(test, train))
        baselines[DISPLAY_NAMES[name]] = ranking_metrics(ranked, test, train, ks, within_class_rows=within) | {
            "code_health": code_health(database_codes, train["label"].to_numpy())
        }
    baselines[RAW_KNN] = study.raw_knn()
    for name in config.classifier_baselines:
        log(f"baseline {DISPLAY_NAMES[name]}")
        model = fit_classifier_baseline(name, study.train_images, train["label"].to_numpy(), 0)
        classified = classification_metrics(test["label"].to_numpy(), model.predict(study.test_images))
        baselines[DISPLAY_NAMES[name]] = {key: classified[key] for key in CLASSIFICATION_KEYS}

    bits_sweep = {}
    for bits in config.bits_sweep:
        metrics = per_seed[0] if bits == config.bits else study.run("ours", bits, 0)
        bits_sweep[str(bits)] = {key: metrics[key] for key in ("accuracy", "recall", "f1")} | {
            "map_at_10": metrics["map_at_k"]["10"],
            "distinct_codes": metrics["code_health"]["distinct_codes"],
        }

    leakage = None
    if config.leakage and split_mode == "patient":
        leakage = _leakage(table, study, per_seed, config.bits, config.split_seed, log)

    report |= {
        "bits": config.bits,
        "recipe": study.recipe.to_dict(),
        "network": network.to_dict(),
        "ours": ours,
        "objectives": objectives,
        "baselines": baselines,
        "ablation": ablation,
        "leakage": leakage,
        "ndcg_at_10": ours["ndcg_at_10"],
        "bits_sweep": bits_sweep,
        "reader_agreement": _reader_agreement(test, predictions),
        "config": asdict(config),
    }
    if diagnosis is not None:
        report["pathology"] = pathology(table, diagnosis, study.recipe, network, log=log)
    return Evaluation(report, ours_rows[:, :10], test, train)


def evaluate_recipe(
    table: pd.DataFrame,
    recipe: TrainConfig,
    split_seed: int = 0,
    seed: int = 0,
    config: EvaluationConfig | None = None,
    network: NetworkConfig | None = None,
) -> dict[str, Any]:
    """One recipe trained once on a patient split of ``table`` and scored as the study scores
    ours (hierarchical search, classification, code health): what a robustness sweep repeats."""
    config = replace(config or EvaluationConfig.quick(), split_seed=split_seed)
    train, test = _split(table, "patient", split_seed)
    study = _Study(train, test, config, recipe, network or NetworkConfig(), lambda _: None)
    return study.run("ours", config.bits, seed)


def evaluate_model(
    table: pd.DataFrame,
    deployed: Deployed,
    log: Callable[[str], None] = lambda _: None,
    diagnosis: pd.DataFrame | None = None,
) -> Evaluation:
    """The deployed model through its index on the table's test split, as users search it: the
    headline (each search mode, code health), how often the readers agree with each other beside
    it, and, with TCIA's ``diagnosis`` sheet, the ``pathology`` section (ours out of fold, under
    the deployed recipe). Minutes at most: no method is retrained but the pathology folds."""
    train, test = _split(table, "patient", 0)
    model = deployed.searcher.model
    log("the deployed model through its index")
    headline, rows, predicted = evaluate_deployed(deployed, test, EvaluationConfig.ks)
    report: dict[str, Any] = {
        "split_mode": "patient",
        "n_queries": len(test),
        "n_database": len(train),
        "deployed": headline,
        "reader_agreement": _reader_agreement(test, {"deployed model": predicted}),
    }
    if diagnosis is not None:
        report["pathology"] = pathology(table, diagnosis, model.config, model.network, log=log)
    index = deployed.searcher.index
    if index.rois is None:  # an index without its pictures: the examples show the training split
        return Evaluation(report, np.full((len(test), 0), -1), test, train)
    shown = index.items.assign(label=np.asarray(index.labels), image=list(index.rois.reshape(len(index), -1)))
    return Evaluation(report, rows[:, :10], test, shown)
