"""Retrieval metrics exactly as DESIGN.md section 6 pins them, graded nDCG, their spread, and how
often the readers agree with each other (the reference for accuracy against their labels).

Everything starts from a *ranked-relevance matrix*: one row per query, one column per rank
(best first), ``True`` where the item at that rank shares the query's ground-truth label. The
database of a query is the other split; the caller's ranking (``ranked_rows``, database row
indices with ``-1`` padding where fewer items were returned) is taken as given, so ties are
already broken (DESIGN.md: by a stable key, the nodule id) and are not this module's concern.

Pinned definitions, per query, for a cut-off ``k``:

- ``P@k``  = relevant in the top k / k. The denominator is ``k`` even when fewer than ``k``
  results came back (padding counts as not relevant), so a short list is not rewarded.
- ``AP@k`` = mean, over the ranks ``i <= k`` that hold a relevant item, of ``P@i``; 0 when no
  relevant item is in the top k. (The denominator is the number of relevant items *retrieved*,
  not ``min(k, relevant in database)``, as the design states.)
- ``MAP@k`` = mean ``AP@k`` over all queries.
- ``TREC AP@k`` = the sum of ``P@i`` over the ranks ``i <= k`` holding a relevant item, divided by
  ``min(k, relevant in database)``: the textbook AP, reported beside the pinned one
  (``trec_map_at_k``); "relevant, then nine misses" scores 1 pinned and 1/min(10, R) here.
- ``R@k``  = relevant in the top k / relevant in the database; 0 when the database holds none.
- ``F1@k`` = harmonic mean of ``P@k`` and ``R@k``; 0 when both are 0.

Classification metrics live in :func:`nodule_pipeline.hashing.training.classification_metrics`.
Pure numpy, so the report asset, the CLI and the tests all score with the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from nodule_pipeline.lidc.annotations import CHARACTERISTICS
from nodule_pipeline.lidc.rois import INDETERMINATE, malignancy_label

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_KS = (5, 10, 20, 50, 100)
"""The cut-offs of the paper's Figures 3 and 4."""


class RatingScale(NamedTuple):
    """The range of one reader rating; ``categorical`` ratings are compared by equality only."""

    low: float
    high: float
    categorical: bool = False


RATING_NAMES = CHARACTERISTICS
"""LIDC's nine characteristics (malignancy last), as the annotation parser names them."""

LIDC_SCALES: dict[str, RatingScale] = {
    "subtlety": RatingScale(1, 5),
    # Soft tissue / fluid / fat / air and popcorn / laminated / solid / non-central / central / absent
    # are categories, not degrees: "fat" is not closer to "fluid" than to "air".
    "internalStructure": RatingScale(1, 4, categorical=True),
    "calcification": RatingScale(1, 6, categorical=True),
    "sphericity": RatingScale(1, 5),
    "margin": RatingScale(1, 5),
    "lobulation": RatingScale(1, 5),
    "spiculation": RatingScale(1, 5),
    "texture": RatingScale(1, 5),
    "malignancy": RatingScale(1, 5),
}
"""The LIDC-IDRI rating scales (the XML schema's ranges)."""

_GAIN_BLOCK_ELEMENTS = 1 << 22  # bound on query-block x database x ratings floats held at once


# --------------------------------------------------------------------------- validation helpers


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_relevance(relevance: np.ndarray) -> np.ndarray:
    relevance = np.asarray(relevance)
    if relevance.ndim != 2:
        raise ValueError(f"relevance must be 2-D (queries, ranks), got shape {relevance.shape}")
    if relevance.dtype != np.bool_:
        if relevance.size and not np.isin(relevance, (0, 1)).all():
            raise ValueError("relevance must hold only booleans or 0/1")
        relevance = relevance.astype(bool)
    return relevance


def _check_labels(query_labels: np.ndarray, database_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    query_labels, database_labels = np.asarray(query_labels), np.asarray(database_labels)
    if query_labels.ndim != 1 or database_labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got query {query_labels.shape} and database {database_labels.shape}")
    return query_labels, database_labels


def _check_ranked_rows(ranked_rows: np.ndarray, n_queries: int, n_database: int) -> np.ndarray:
    """Rows must be integer database indices or -1, one ranking per query, no item twice:
    a duplicate would count one relevant item several times and push recall above 1."""
    ranked_rows = np.asarray(ranked_rows)
    if ranked_rows.ndim != 2 or ranked_rows.shape[0] != n_queries:
        raise ValueError(f"ranked_rows must be 2-D ({n_queries}, K), got shape {ranked_rows.shape}")
    if ranked_rows.size == 0:
        return ranked_rows.astype(np.int64)
    if not np.issubdtype(ranked_rows.dtype, np.integer):
        raise ValueError(f"ranked_rows must be integers, got dtype {ranked_rows.dtype}")
    ranked_rows = ranked_rows.astype(np.int64)
    if ranked_rows.min() < -1 or ranked_rows.max() >= n_database:
        raise ValueError(f"ranked_rows must lie in [-1, {n_database}), got [{ranked_rows.min()}, {ranked_rows.max()}]")
    ordered = np.sort(ranked_rows, axis=1)
    if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)):
        raise ValueError("a ranking lists the same database row more than once")
    return ranked_rows


def _check_counts(relevant_in_db: np.ndarray, n_queries: int) -> np.ndarray:
    counts = np.asarray(relevant_in_db)
    if counts.shape != (n_queries,):
        raise ValueError(f"relevant_in_db must have shape ({n_queries},), got {counts.shape}")
    if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
        raise ValueError("relevant_in_db must hold non-negative integer counts")
    return counts.astype(np.int64)


def _values(values: Any, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"no values for {what}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} needs finite values")
    return values


# --------------------------------------------------------------------------- relevance


def ranked_relevance(query_labels: np.ndarray, database_labels: np.ndarray, ranked_rows: np.ndarray) -> np.ndarray:
    """(q,) query labels, (n,) database labels, (q, K) ranked database rows (-1 padding) ->
    (q, K) bool, True where the ranked item shares the query's label. Padding is never relevant,
    so a short result list is scored as if the missing ranks held wrong items."""
    query_labels, database_labels = _check_labels(query_labels, database_labels)
    rows = _check_ranked_rows(ranked_rows, len(query_labels), len(database_labels))
    if rows.size == 0 or len(database_labels) == 0:
        return np.zeros(rows.shape, dtype=bool)
    valid = rows >= 0
    return valid & (database_labels[np.where(valid, rows, 0)] == query_labels[:, None])


def relevant_counts(query_labels: np.ndarray, database_labels: np.ndarray) -> np.ndarray:
    """(q,) int64: how many database items share each query's label (the denominator of recall)."""
    query_labels, database_labels = _check_labels(query_labels, database_labels)
    ordered = np.sort(database_labels)
    right = np.searchsorted(ordered, query_labels, side="right")
    left = np.searchsorted(ordered, query_labels, side="left")
    return (right - left).astype(np.int64)


# --------------------------------------------------------------------------- per-query metrics


def _hits(relevance: np.ndarray, k: int) -> np.ndarray:
    return relevance[:, :k].sum(axis=1).astype(np.int64)


def precision_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """(q,) P@k = relevant in the top k / k; ``k`` stays the denominator when fewer than ``k``
    results were returned (fewer columns than ``k``, or ``False`` padding)."""
    relevance, k = _check_relevance(relevance), _check_k(k)
    return _hits(relevance, k) / k


def average_precision_at_k(relevance: np.ndarray, k: int) -> np.ndarray:
    """(q,) AP@k = mean of P@i over the ranks i <= k holding a relevant item; 0 when none does."""
    relevance, k = _check_relevance(relevance), _check_k(k)
    top = relevance[:, :k]
    hits = top.sum(axis=1)
    precision_at_i = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    summed = np.where(top, precision_at_i, 0.0).sum(axis=1)
    return np.divide(summed, hits, out=np.zeros(len(top)), where=hits > 0)


def trec_average_precision_at_k(relevance: np.ndarray, relevant_in_db: np.ndarray, k: int) -> np.ndarray:
    """(q,) TREC AP@k = sum of P@i over the ranks i <= k holding a relevant item / min(k, relevant
    in the database); 0 when the database holds none."""
    relevance, k = _check_relevance(relevance), _check_k(k)
    counts = _check_counts(relevant_in_db, len(relevance))
    top = relevance[:, :k]
    if np.any(top.sum(axis=1) > counts):
        raise ValueError("more relevant items retrieved than the database holds: relevant_in_db does not match")
    precision_at_i = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    summed = np.where(top, precision_at_i, 0.0).sum(axis=1)
    denominator = np.minimum(counts, k)
    return np.divide(summed, denominator, out=np.zeros(len(top)), where=denominator > 0)


def mean_average_precision(relevance: np.ndarray, k: int) -> float:
    """MAP@k = mean AP@k over all queries."""
    ap = average_precision_at_k(relevance, k)
    if ap.size == 0:
        raise ValueError("no queries to score")
    return float(ap.mean())


def recall_at_k(relevance: np.ndarray, relevant_in_db: np.ndarray, k: int) -> np.ndarray:
    """(q,) R@k = relevant in the top k / relevant in the database; 0 when the database holds none."""
    relevance, k = _check_relevance(relevance), _check_k(k)
    counts = _check_counts(relevant_in_db, len(relevance))
    hits = _hits(relevance, k)
    if np.any(hits > counts):
        raise ValueError("more relevant items retrieved than the database holds: relevant_in_db does not match")
    return np.divide(hits, counts, out=np.zeros(len(hits)), where=counts > 0)


def f1_at_k(relevance: np.ndarray, relevant_in_db: np.ndarray, k: int) -> np.ndarray:
    """(q,) F1@k = 2 P R / (P + R) from P@k and R@k; 0 when both are 0."""
    precision = precision_at_k(relevance, k)
    recall = recall_at_k(relevance, relevant_in_db, k)
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros(len(total)), where=total > 0)


def per_query_metrics(relevance: np.ndarray, relevant_in_db: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-query ``ap``, ``trec_ap``, ``precision``, ``recall``, ``f1`` at ``k``: the samples that
    :func:`bootstrap_interval` resamples."""
    return {
        "ap": average_precision_at_k(relevance, k),
        "trec_ap": trec_average_precision_at_k(relevance, relevant_in_db, k),
        "precision": precision_at_k(relevance, k),
        "recall": recall_at_k(relevance, relevant_in_db, k),
        "f1": f1_at_k(relevance, relevant_in_db, k),
    }


MEAN_NAMES = {"ap": "map", "trec_ap": "trec_map"}
"""The mean over queries of a per-query AP is a MAP."""


def retrieval_metrics(
    relevance: np.ndarray, relevant_in_db: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """Mean metrics over the queries, shaped for the evaluation report::

        {"n_queries": q, "map_at_k": {"5": .., "10": .., ...}, "trec_map_at_k": {"5": .., ...},
         "p_at_10": .., "precision_at_10": .. (the same number), "recall_at_10": .., "f1_at_10": ..,
         "per_k": {"5": {"map": .., "trec_map": .., "precision": .., "recall": .., "f1": ..}, ...}}

    The @10 entries are always present (the paper's headline cut-off) whether or not 10 is in
    ``ks``. Plain Python floats, so the dict goes straight to JSON.
    """
    relevance = _check_relevance(relevance)
    if len(relevance) == 0:
        raise ValueError("no queries to score")
    ks = [_check_k(k) for k in ks]
    if not ks:
        raise ValueError("ks must name at least one cut-off")
    per_k: dict[str, dict[str, float]] = {}
    for k in sorted(set(ks) | {10}):
        per_query = per_query_metrics(relevance, relevant_in_db, k)
        per_k[str(k)] = {MEAN_NAMES.get(name, name): float(v.mean()) for name, v in per_query.items()}
    at_10 = per_k["10"]
    return {
        "n_queries": len(relevance),
        "map_at_k": {str(k): per_k[str(k)]["map"] for k in sorted(set(ks))},
        "trec_map_at_k": {str(k): per_k[str(k)]["trec_map"] for k in sorted(set(ks))},
        "p_at_10": at_10["precision"],
        "precision_at_10": at_10["precision"],
        "recall_at_10": at_10["recall"],
        "f1_at_10": at_10["f1"],
        "per_k": {str(k): per_k[str(k)] for k in sorted(set(ks))},
    }


# --------------------------------------------------------------------------- graded relevance


def ratings_matrix(table: pd.DataFrame, names: Sequence[str] = RATING_NAMES) -> np.ndarray:
    """(n, len(names)) float64 ratings from an ROI table; a missing column or a null cell is NaN,
    so tables without characteristics fall back to label-only gain in :func:`ndcg_at_k`."""
    n = len(table)
    columns = [
        table[name].to_numpy(dtype=np.float64, na_value=np.nan) if name in table.columns else np.full(n, np.nan)
        for name in names
    ]
    return np.stack(columns, axis=1) if columns else np.empty((n, 0))


def table_ratings(table: pd.DataFrame) -> np.ndarray | None:
    """:func:`ratings_matrix` of a table that has the readers' characteristics (at least
    malignancy and texture columns), None for one that has none."""
    return ratings_matrix(table) if {"malignancy", "texture"} <= set(table.columns) else None


def _check_scales(scales: Sequence[RatingScale | tuple[float, float]] | None, n_ratings: int) -> list[RatingScale]:
    if scales is None:
        if n_ratings not in (0, len(RATING_NAMES)):
            raise ValueError(f"{n_ratings} rating columns but no scales: default scales are for {RATING_NAMES}")
        return [LIDC_SCALES[name] for name in RATING_NAMES][:n_ratings]
    checked = [RatingScale(*scale) for scale in scales]
    if len(checked) != n_ratings:
        raise ValueError(f"{len(checked)} scales for {n_ratings} rating columns")
    for scale in checked:
        if not scale.high > scale.low:
            raise ValueError(f"a rating scale needs high > low, got {scale}")
    return checked


def _ratings(ratings: np.ndarray | None, n: int, what: str) -> np.ndarray:
    if ratings is None:
        return np.empty((n, 0))
    ratings = np.asarray(ratings, dtype=np.float64)
    if ratings.ndim != 2 or ratings.shape[0] != n:
        raise ValueError(f"{what} ratings must be 2-D ({n}, r), got shape {ratings.shape}")
    return ratings


def _gain_block(
    query_ratings: np.ndarray,
    database_ratings: np.ndarray,
    same_label: np.ndarray,
    span: np.ndarray,
    categorical: np.ndarray,
) -> np.ndarray:
    """(b, n) gains for a block of queries; see :func:`graded_gain` for the formula."""
    if query_ratings.shape[1] == 0:
        return same_label.astype(np.float64)
    diff = np.abs(query_ratings[:, None, :] - database_ratings[None, :, :])  # (b, n, r), NaN where either is missing
    distance = np.where(categorical, (diff > 0).astype(np.float64), np.minimum(diff / span, 1.0))
    present = ~np.isnan(diff)
    n_present = present.sum(axis=2)
    summed = np.where(present, distance, 0.0).sum(axis=2)
    mean_distance = np.divide(summed, n_present, out=np.zeros(summed.shape), where=n_present > 0)
    return same_label * (1.0 - mean_distance)


def _gain_setup(
    query_ratings: np.ndarray | None,
    database_ratings: np.ndarray | None,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    scales: Sequence[RatingScale | tuple[float, float]] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    query_labels, database_labels = _check_labels(query_labels, database_labels)
    q_ratings = _ratings(query_ratings, len(query_labels), "query")
    d_ratings = _ratings(database_ratings, len(database_labels), "database")
    if q_ratings.shape[1] != d_ratings.shape[1]:
        raise ValueError(f"query has {q_ratings.shape[1]} rating columns, database {d_ratings.shape[1]}")
    checked = _check_scales(scales, q_ratings.shape[1])
    span = np.array([s.high - s.low for s in checked], dtype=np.float64)
    categorical = np.array([s.categorical for s in checked], dtype=bool)
    return query_labels, database_labels, q_ratings, d_ratings, span, categorical


def _block_size(n_database: int, n_ratings: int) -> int:
    return max(1, _GAIN_BLOCK_ELEMENTS // max(1, n_database * max(1, n_ratings)))


def graded_gain(
    query_ratings: np.ndarray | None,
    database_ratings: np.ndarray | None,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    scales: Sequence[RatingScale | tuple[float, float]] | None = None,
) -> np.ndarray:
    """(q, n) graded relevance of every database item to every query, in [0, 1]::

        gain(q, d) = [label_q == label_d] * (1 - mean_{j in J} dist_j(q, d))
        dist_j     = min(|r_qj - r_dj| / (high_j - low_j), 1)   ordinal ratings
                   = [r_qj != r_dj]                              categorical ratings
        J          = the ratings present (not NaN) for both q and d

    With J empty (no characteristics in the table, or none shared) the gain is the binary label
    match alone: tables without characteristics still get an nDCG, equal to a binary nDCG.
    The label factor keeps the graded relevance consistent with the binary one: an item of the
    other class never earns gain however similar it looks. ``scales`` default: :data:`LIDC_SCALES`
    in :data:`RATING_NAMES` order (internalStructure and calcification categorical).
    """
    query_labels, database_labels, q_ratings, d_ratings, span, categorical = _gain_setup(
        query_ratings, database_ratings, query_labels, database_labels, scales
    )
    out = np.empty((len(query_labels), len(database_labels)))
    step = _block_size(len(database_labels), q_ratings.shape[1])
    for start in range(0, len(query_labels), step):
        block = slice(start, start + step)
        same = query_labels[block, None] == database_labels[None, :]
        out[block] = _gain_block(q_ratings[block], d_ratings, same, span, categorical)
    return out


def ndcg_at_k(
    query_ratings: np.ndarray | None,
    database_ratings: np.ndarray | None,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    ranked_rows: np.ndarray,
    k: int = 10,
    scales: Sequence[RatingScale | tuple[float, float]] | None = None,
) -> tuple[np.ndarray, float]:
    """Per-query nDCG@k on the graded gain of :func:`graded_gain`, and its mean over queries.

    ``DCG@k = sum_{i=1..k} gain_i / log2(i + 1)`` with linear gain (already in [0, 1]); padding
    (-1) and ranks past the returned list have gain 0. The ideal DCG is that of the best possible
    ordering of the *whole database* for the query (its k largest gains), not a re-sort of the
    returned top k: a ranking that misses the best matches altogether is penalised. nDCG is 0
    when the ideal DCG is 0 (no database item shares the query's label), like AP and recall.
    Ratings may be ``None`` or hold NaN: see the label-only fallback of :func:`graded_gain`.
    """
    k = _check_k(k)
    query_labels, database_labels, q_ratings, d_ratings, span, categorical = _gain_setup(
        query_ratings, database_ratings, query_labels, database_labels, scales
    )
    n_queries, n_database = len(query_labels), len(database_labels)
    if n_queries == 0:
        raise ValueError("no queries to score")
    rows = _check_ranked_rows(ranked_rows, n_queries, n_database)[:, :k]
    if rows.shape[1] < k:
        rows = np.pad(rows, ((0, 0), (0, k - rows.shape[1])), constant_values=-1)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg = np.zeros(n_queries)
    step = _block_size(n_database, q_ratings.shape[1])
    for start in range(0, n_queries if n_database else 0, step):
        block = slice(start, start + step)
        same = query_labels[block, None] == database_labels[None, :]
        gains = _gain_block(q_ratings[block], d_ratings, same, span, categorical)  # (b, n)
        block_rows = rows[block]
        ranked = np.where(block_rows >= 0, np.take_along_axis(gains, np.maximum(block_rows, 0), axis=1), 0.0)
        dcg = ranked @ discount
        top = min(k, n_database)
        best = -np.sort(-np.partition(gains, n_database - top, axis=1)[:, n_database - top :], axis=1)
        ideal = best @ discount[:top]
        ndcg[block] = np.divide(dcg, ideal, out=np.zeros(len(dcg)), where=ideal > 0)
    return ndcg, float(ndcg.mean())


# --------------------------------------------------------------------------- spread


def bootstrap_interval(
    per_query_values: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over queries: resample the queries with
    replacement ``n_resamples`` times (seeded, so a report is reproducible) and take the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means."""
    values = _values(per_query_values, "a bootstrap interval")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, _GAIN_BLOCK_ELEMENTS // len(values))  # bound the (resamples, n) index block
    for start in range(0, n_resamples, step):
        count = min(step, n_resamples - start)
        means[start : start + count] = values[rng.integers(0, len(values), size=(count, len(values)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def mean_std(values: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over seeds; the std of a single value is 0."""
    values = _values(values, "a mean")
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def difference_interval(
    first: np.ndarray | Sequence[float], second: np.ndarray | Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """``mean(second) - mean(first)`` over seeds and its Welch t interval (unequal variances,
    Welch-Satterthwaite degrees of freedom). With one value per side, or no spread on either,
    the interval collapses onto the difference: there is nothing to estimate the noise from."""
    from scipy import stats

    a, b = _values(first, "a difference"), _values(second, "a difference")
    difference = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return difference, difference, difference
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return difference, difference, difference
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, dof) * np.sqrt(va + vb))
    return difference, difference - half, difference + half


# --------------------------------------------------------------------------- the readers' own agreement

MIN_READERS_FOR_AGREEMENT = 3
"""A reader is compared with the median of at least two others, never with one other reader."""


@dataclass(frozen=True)
class ReaderAgreement:
    """How often one reader's benign/malignant call matches the median of the other readers of
    the same nodule: the noise in labels made of readers' ratings (a nodule's median in a table
    of one row per nodule, each reader's own call in the pipeline's rows per annotation), the
    reference a model's accuracy is read against. A model that agrees with the labels as often
    as a radiologist agrees with the others has learnt about as much as they can teach. A call
    is one reader of one nodule read by ``min_readers`` or more, where neither that reader's
    rating nor the others' median is 3 (indeterminate). ``rows``: the table rows whose nodule
    has that many readers."""

    calls: int
    agreeing: int
    nodules: int
    min_readers: int
    rows: np.ndarray

    @property
    def rate(self) -> float:
        return self.agreeing / self.calls if self.calls else float("nan")

    def summary(self, labels: np.ndarray, predictions: dict[str, np.ndarray]) -> dict[str, Any]:
        """JSON-ready figures, with each model's accuracy on the same rows (its like-for-like figure)."""
        rows = self.rows
        return {
            "agreement": self.rate,
            "calls": self.calls,
            "nodules": self.nodules,
            "min_readers": self.min_readers,
            "rows": int(rows.sum()),
            "model_accuracy": {
                name: float((np.asarray(predicted)[rows] == np.asarray(labels)[rows]).mean()) if rows.any() else None
                for name, predicted in predictions.items()
            },
        }


def nodule_ratings(table: pd.DataFrame) -> list[tuple[float, ...]] | None:
    """Each row's nodule's malignancy ratings, one per reader who marked it (rating 3 included),
    or None when the table cannot say.

    ``reader_malignancy`` (one rating per reader, 0 where that reader did not mark the nodule)
    is read as it is. A table the pipeline derives holds one row per annotation rated 1, 2, 4 or 5:
    the nodule's ratings are its rows' ``malignancy``, plus a 3 for each of its ``nodule_readers``
    without a row (those were dropped as indeterminate)."""
    if "reader_malignancy" in table.columns:
        return [
            tuple(float(r) for r in np.asarray(ratings, dtype=float).ravel() if r > 0)
            for ratings in table["reader_malignancy"]
        ]
    if not {"nodule_id", "malignancy", "nodule_readers"} <= set(table.columns):
        return None
    rated = table.groupby("nodule_id", sort=False)["malignancy"].agg(lambda values: tuple(float(v) for v in values))
    return [
        rated[nodule] + (float(INDETERMINATE),) * _dropped_readers(readers, len(rated[nodule]))
        for nodule, readers in zip(table["nodule_id"], table["nodule_readers"], strict=True)
    ]


def _dropped_readers(readers: object, rows: int) -> int:
    """Readers of a nodule without a row (they rated it 3); an unknown reader count adds none."""
    count = float(readers)  # type: ignore[arg-type]
    return max(int(count) - rows, 0) if np.isfinite(count) else 0


def reader_agreement(table: pd.DataFrame, min_readers: int = MIN_READERS_FOR_AGREEMENT) -> ReaderAgreement | None:
    """Leave-one-reader-out agreement over the table's nodules (see :class:`ReaderAgreement`);
    None when the table does not carry the readers' ratings."""
    ratings = nodule_ratings(table)
    if ratings is None:
        return None
    calls = agreeing = 0
    seen: set[str] = set()
    counted = np.zeros(len(table), dtype=bool)
    for row, (nodule, rated) in enumerate(zip(table["nodule_id"].astype(str), ratings, strict=True)):
        if len(rated) < min_readers:
            continue
        counted[row] = True
        if nodule in seen:  # one row per annotation: the nodule's readers are counted once
            continue
        seen.add(nodule)
        for reader, rating in enumerate(rated):
            others = malignancy_label(float(np.median(rated[:reader] + rated[reader + 1 :])))
            own = malignancy_label(rating)
            if own >= 0 and others >= 0:
                calls += 1
                agreeing += int(own == others)
    return ReaderAgreement(calls, agreeing, len(seen), min_readers, counted)
