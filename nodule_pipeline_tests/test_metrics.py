"""Every retrieval metric against hand-computed cases (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from nodule_pipeline.hashing import metrics as m

# The shared fixture. Database of 7 items:   row:   0  1  2  3  4  5  6
DB_LABELS = np.array([1, 0, 1, 1, 0, 0, 1])  # label: 1  0  1  1  0  0  1  -> four 1s, three 0s
QUERY_LABELS = np.array([1, 2, 0, 0])
RANKED = np.array(
    [
        [0, 1, 2, 4, 3, 5],  # q0 (label 1): labels 1 0 1 0 1 0 -> R N R N R N, row 6 never returned
        [0, 1, 2, 3, 4, 5],  # q1 (label 2): no item of label 2 in the database -> nothing relevant
        [1, 4, 5, -1, -1, -1],  # q2 (label 0): all three 0s first, then padding
        [0, 2, 3, 6, -1, -1],  # q3 (label 0): only 1s returned -> none relevant although 3 exist
    ]
)
EXPECTED_RELEVANCE = np.array(
    [
        [True, False, True, False, True, False],
        [False] * 6,
        [True, True, True, False, False, False],
        [False] * 6,
    ]
)


@pytest.fixture
def relevance() -> np.ndarray:
    return m.ranked_relevance(QUERY_LABELS, DB_LABELS, RANKED)


@pytest.fixture
def counts() -> np.ndarray:
    return m.relevant_counts(QUERY_LABELS, DB_LABELS)


def test_ranked_relevance_and_counts(relevance: np.ndarray, counts: np.ndarray) -> None:
    np.testing.assert_array_equal(relevance, EXPECTED_RELEVANCE)  # padding (-1) is never relevant
    np.testing.assert_array_equal(counts, [4, 0, 3, 3])  # four 1s, no 2s, three 0s, three 0s
    # labels need not be integers
    np.testing.assert_array_equal(m.relevant_counts(np.array(["b", "m"]), np.array(["m", "m", "b"])), [1, 2])


def test_ranked_relevance_rejects_bad_rankings() -> None:
    with pytest.raises(ValueError, match="more than once"):
        m.ranked_relevance(QUERY_LABELS[:1], DB_LABELS, np.array([[0, 2, 0]]))
    with pytest.raises(ValueError, match=r"\[-1, 7\)"):
        m.ranked_relevance(QUERY_LABELS[:1], DB_LABELS, np.array([[0, 7]]))
    with pytest.raises(ValueError, match="integers"):
        m.ranked_relevance(QUERY_LABELS[:1], DB_LABELS, np.array([[0.0, 1.0]]))
    # repeated padding is fine; an empty database allows only padding
    assert not m.ranked_relevance(QUERY_LABELS[:1], np.array([], dtype=int), np.array([[-1, -1]])).any()


def test_precision_at_k(relevance: np.ndarray) -> None:
    # k=2: q0 R N -> 1/2; q2 R R -> 2/2
    np.testing.assert_allclose(m.precision_at_k(relevance, 2), [0.5, 0.0, 1.0, 0.0])
    # k=5: q0 R N R N R -> 3/5; q2 R R R - - -> 3/5
    np.testing.assert_allclose(m.precision_at_k(relevance, 5), [0.6, 0.0, 0.6, 0.0])
    # k=10 > 6 returned columns > 7 database items: the denominator stays 10 -> q0 3/10, q2 3/10
    np.testing.assert_allclose(m.precision_at_k(relevance, 10), [0.3, 0.0, 0.3, 0.0])


def test_average_precision_at_k(relevance: np.ndarray) -> None:
    # q0, k=5: relevant at ranks 1, 3, 5 -> (1/1 + 2/3 + 3/5) / 3 = (15 + 10 + 9) / 45 = 34/45
    # q2: relevant at ranks 1, 2, 3 -> (1 + 1 + 1) / 3 = 1; q1, q3: nothing relevant -> 0
    np.testing.assert_allclose(m.average_precision_at_k(relevance, 5), [34 / 45, 0.0, 1.0, 0.0])
    # k=10 adds no relevant rank (columns 6+ do not exist) -> same as k=5
    np.testing.assert_allclose(m.average_precision_at_k(relevance, 10), [34 / 45, 0.0, 1.0, 0.0])
    # q0, k=2: only rank 1 is relevant -> P@1 = 1; k=1 likewise
    np.testing.assert_allclose(m.average_precision_at_k(relevance, 2), [1.0, 0.0, 1.0, 0.0])
    # the denominator is the relevant items retrieved, not those in the database:
    # R N N N with 5 relevant in the database -> AP@4 = P@1 / 1 = 1
    assert m.average_precision_at_k(np.array([[True, False, False, False]]), 4)[0] == 1.0
    # MAP@5 = (34/45 + 0 + 1 + 0) / 4 = 79/180
    assert m.mean_average_precision(relevance, 5) == pytest.approx(79 / 180)


def test_trec_average_precision_divides_by_the_relevant_items_it_could_retrieve(
    relevance: np.ndarray, counts: np.ndarray
) -> None:
    # q0, k=5: P@1 + P@3 + P@5 = 1 + 2/3 + 3/5 = 34/15, over min(5, 4 relevant) = 4 -> 17/30
    # q1: none in the database -> 0; q2: 3 / min(5, 3) = 1; q3: nothing retrieved of 3 -> 0
    np.testing.assert_allclose(m.trec_average_precision_at_k(relevance, counts, 5), [17 / 30, 0.0, 1.0, 0.0])
    # k=2: q0 P@1 = 1 over min(2, 4) = 2 -> 1/2 (pinned AP: 1); q2 (1 + 1) / 2 = 1
    np.testing.assert_allclose(m.trec_average_precision_at_k(relevance, counts, 2), [0.5, 0.0, 1.0, 0.0])
    # k=10 > returned columns: the denominator is min(10, relevant) -> as at k=5
    np.testing.assert_allclose(m.trec_average_precision_at_k(relevance, counts, 10), [17 / 30, 0.0, 1.0, 0.0])
    # "relevant, then misses" with 5 relevant in the database: pinned AP@4 = 1, TREC AP@4 = 1/4
    one_hit = np.array([[True, False, False, False]])
    assert m.trec_average_precision_at_k(one_hit, np.array([5]), 4)[0] == pytest.approx(0.25)
    assert m.trec_average_precision_at_k(one_hit, np.array([1]), 4)[0] == 1.0  # the only relevant item, first
    with pytest.raises(ValueError, match="relevant_in_db"):
        m.trec_average_precision_at_k(relevance, np.array([1, 0, 3, 3]), 5)


def test_recall_and_f1_at_k(relevance: np.ndarray, counts: np.ndarray) -> None:
    # k=5: q0 3 of 4 -> 0.75; q1 database holds none -> 0; q2 3 of 3 -> 1; q3 0 of 3 -> 0
    np.testing.assert_allclose(m.recall_at_k(relevance, counts, 5), [0.75, 0.0, 1.0, 0.0])
    # k=2: q0 1 of 4; q2 2 of 3
    np.testing.assert_allclose(m.recall_at_k(relevance, counts, 2), [0.25, 0.0, 2 / 3, 0.0])
    # F1@5: q0 2*0.6*0.75/1.35 = 0.9/1.35 = 2/3; q2 2*0.6*1/1.6 = 0.75; P = R = 0 -> 0
    np.testing.assert_allclose(m.f1_at_k(relevance, counts, 5), [2 / 3, 0.0, 0.75, 0.0])
    # F1@2: q0 2*0.5*0.25/0.75 = 1/3; q2 2*1*(2/3)/(5/3) = 0.8
    np.testing.assert_allclose(m.f1_at_k(relevance, counts, 2), [1 / 3, 0.0, 0.8, 0.0])
    # F1@10: q0 P 0.3 R 0.75 -> 0.45/1.05 = 3/7; q2 P 0.3 R 1 -> 0.6/1.3 = 6/13
    np.testing.assert_allclose(m.f1_at_k(relevance, counts, 10), [3 / 7, 0.0, 6 / 13, 0.0])
    with pytest.raises(ValueError, match="relevant_in_db"):
        m.recall_at_k(relevance, np.array([1, 0, 3, 3]), 5)  # q0 retrieved 3 but "1 in the database"


def test_all_relevant_and_none_relevant() -> None:
    everything = np.ones((1, 4), dtype=bool)
    nothing = np.zeros((1, 4), dtype=bool)
    # all 4 database items relevant and returned: P = AP = R = F1 = 1
    for values in m.per_query_metrics(everything, np.array([4]), 4).values():
        np.testing.assert_allclose(values, [1.0])
    # none relevant: all 0, whether or not the database holds relevant items
    for held in (0, 3):
        for values in m.per_query_metrics(nothing, np.array([held]), 4).values():
            np.testing.assert_allclose(values, [0.0])


def test_empty_result_list() -> None:
    # no result columns at all (k larger than an empty list): every metric 0
    empty = m.ranked_relevance(np.array([1]), DB_LABELS, np.empty((1, 0), dtype=np.int64))
    assert empty.shape == (1, 0)
    for values in m.per_query_metrics(empty, np.array([4]), 10).values():
        np.testing.assert_allclose(values, [0.0])


def test_retrieval_metrics_shape_and_means(relevance: np.ndarray, counts: np.ndarray) -> None:
    report = m.retrieval_metrics(relevance, counts, ks=(2, 5))
    assert report["n_queries"] == 4
    assert list(report["map_at_k"]) == ["2", "5"]  # keys are strings, for JSON
    assert report["map_at_k"]["2"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert report["map_at_k"]["5"] == pytest.approx(79 / 180)
    # @10 is always reported: P (0.3 + 0 + 0.3 + 0) / 4, R (0.75 + 0 + 1 + 0) / 4, F1 (3/7 + 6/13) / 4
    assert report["p_at_10"] == report["precision_at_10"] == pytest.approx(0.15)
    assert report["recall_at_10"] == pytest.approx(0.4375)
    assert report["f1_at_10"] == pytest.approx((3 / 7 + 6 / 13) / 4)
    # f1@5 = (2/3 + 0.75) / 4 = (8/12 + 9/12) / 4 = 17/48; TREC MAP@5 = (17/30 + 0 + 1 + 0) / 4 = 47/120
    assert report["per_k"]["5"] == pytest.approx(
        {"map": 79 / 180, "trec_map": 47 / 120, "precision": 0.3, "recall": 0.4375, "f1": 17 / 48}
    )
    assert report["trec_map_at_k"] == pytest.approx({"2": (0.5 + 1) / 4, "5": 47 / 120})
    json.dumps(report)  # plain Python numbers only
    assert list(m.retrieval_metrics(relevance, counts)["map_at_k"]) == ["5", "10", "20", "50", "100"]
    with pytest.raises(ValueError, match="no queries"):
        m.retrieval_metrics(np.zeros((0, 3), dtype=bool), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="positive integer"):
        m.precision_at_k(relevance, 0)


# --------------------------------------------------------------------------- nDCG

LOG2_3 = math.log2(3)  # discount of rank 2 is 1/log2(3); rank 1 is 1/log2(2) = 1


def test_ndcg_identical_characteristics() -> None:
    ratings = np.full((3, 9), 3.0)
    query = np.full((1, 9), 3.0)
    labels = np.array([1, 1, 0])  # gains with identical ratings: 1, 1, 0
    perfect, mean = m.ndcg_at_k(query, ratings, np.array([1]), labels, np.array([[0, 1, 2]]), k=3)
    assert perfect[0] == pytest.approx(1.0) and mean == pytest.approx(1.0)
    # ranking 2, 0, 1: DCG = 0 + 1/log2(3) + 1/2; ideal 1 + 1/log2(3)
    worse, _ = m.ndcg_at_k(query, ratings, np.array([1]), labels, np.array([[2, 0, 1]]), k=3)
    assert worse[0] == pytest.approx((1 / LOG2_3 + 0.5) / (1 + 1 / LOG2_3))  # 0.6934
    assert worse[0] < 1.0


def test_ndcg_graded_gain_and_ideal_over_whole_database() -> None:
    scales = [(1, 5), (1, 5)]
    query = np.array([[5.0, 5.0]])
    database = np.array([[5.0, 5.0], [3.0, 5.0], [1.0, 1.0], [5.0, 5.0]])
    labels = np.array([1, 1, 1, 0])
    # gains: d0 identical -> 1; d1 (|5-3|/4 + 0)/2 = 0.25 -> 0.75; d2 (1 + 1)/2 = 1 -> 0; d3 other label -> 0
    gain = m.graded_gain(query, database, np.array([1]), labels, scales)
    np.testing.assert_allclose(gain, [[1.0, 0.75, 0.0, 0.0]])
    # ranking 1, 0 at k=2: DCG = 0.75 + 1/log2(3); ideal = 1 + 0.75/log2(3)
    per_query, _ = m.ndcg_at_k(query, database, np.array([1]), labels, np.array([[1, 0, 2, 3]]), k=2, scales=scales)
    assert per_query[0] == pytest.approx((0.75 + 1 / LOG2_3) / (1 + 0.75 / LOG2_3))  # 0.9374
    # only d1 returned (padding after): k=1 -> 0.75 / 1, not 1: the ideal sees the whole database
    per_query, _ = m.ndcg_at_k(query, database, np.array([1]), labels, np.array([[1, -1]]), k=1, scales=scales)
    assert per_query[0] == pytest.approx(0.75)
    # k larger than database and list: ranks 3.. are padding; DCG = 1 + 0.75/log2(3) = ideal -> 1
    per_query, _ = m.ndcg_at_k(query, database, np.array([1]), labels, np.array([[0, 1]]), k=10, scales=scales)
    assert per_query[0] == pytest.approx(1.0)
    # a query whose label is absent from the database: ideal DCG 0 -> nDCG 0
    two_queries = np.array([[5.0, 5.0], [5.0, 5.0]])
    ranked = np.array([[0, 1], [0, 1]])
    per_query, mean = m.ndcg_at_k(two_queries, database, np.array([1, 7]), labels, ranked, k=2, scales=scales)
    np.testing.assert_allclose(per_query, [1.0, 0.0])
    assert mean == pytest.approx(0.5)


def test_ndcg_blocks_match_a_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Query blocks (forced tiny here) must give what a per-query loop over the formula gives."""
    rng = np.random.default_rng(0)
    q_ratings, d_ratings = rng.integers(1, 6, (7, 9)).astype(float), rng.integers(1, 6, (11, 9)).astype(float)
    d_ratings[rng.random(d_ratings.shape) < 0.2] = np.nan
    q_labels, d_labels = rng.integers(0, 2, 7), rng.integers(0, 2, 11)
    ranked = np.array([rng.permutation(11)[:6] for _ in range(7)])
    monkeypatch.setattr(m, "_GAIN_BLOCK_ELEMENTS", 30)  # 30 // (11 * 9) -> one query per block
    per_query, _ = m.ndcg_at_k(q_ratings, d_ratings, q_labels, d_labels, ranked, k=5)
    spans = np.array([m.LIDC_SCALES[n].high - m.LIDC_SCALES[n].low for n in m.RATING_NAMES])
    categorical = np.array([m.LIDC_SCALES[n].categorical for n in m.RATING_NAMES])
    for qi in range(7):
        gains = []
        for di in range(11):
            present = ~np.isnan(d_ratings[di])
            diff = np.abs(q_ratings[qi] - d_ratings[di])
            dist = np.where(categorical, diff > 0, diff / spans)[present]
            gains.append(float(q_labels[qi] == d_labels[di]) * (1 - dist.mean()))
        dcg = sum(gains[row] / math.log2(i + 2) for i, row in enumerate(ranked[qi, :5]))
        ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gains, reverse=True)[:5]))
        assert per_query[qi] == pytest.approx(dcg / ideal if ideal else 0.0)


def test_lidc_scales_categorical_ratings() -> None:
    query = np.full((1, 9), 3.0)
    calcification_differs = query.copy()
    calcification_differs[0, m.RATING_NAMES.index("calcification")] = 4.0
    subtlety_differs = query.copy()
    subtlety_differs[0, m.RATING_NAMES.index("subtlety")] = 4.0
    database = np.vstack([calcification_differs, subtlety_differs])
    gain = m.graded_gain(query, database, np.array([0]), np.array([0, 0]))
    # categorical: any difference counts 1 -> 1 - 1/9; ordinal subtlety |3-4|/(5-1) = 0.25 -> 1 - 0.25/9
    np.testing.assert_allclose(gain, [[1 - 1 / 9, 1 - 0.25 / 9]])


def test_ndcg_label_only_fallback_with_nan_ratings() -> None:
    labels = np.array([1, 0, 1])
    ranked = np.array([[1, 0, 2]])
    # label-only gains 0, 1, 1 -> DCG 1/log2(3) + 1/2; ideal 1 + 1/log2(3)
    expected = (1 / LOG2_3 + 0.5) / (1 + 1 / LOG2_3)
    nan_db = np.full((3, 9), np.nan)
    nan_query = np.full((1, 9), np.nan)
    per_query, _ = m.ndcg_at_k(nan_query, nan_db, np.array([1]), labels, ranked, k=3)
    assert per_query[0] == pytest.approx(expected)
    per_query, _ = m.ndcg_at_k(None, None, np.array([1]), labels, ranked, k=3)  # no ratings at all
    assert per_query[0] == pytest.approx(expected)
    # partly missing: only the first rating is shared, |5-3|/4 = 0.5 -> gain 0.5
    gain = m.graded_gain(np.array([[5.0, np.nan]]), np.array([[3.0, 1.0]]), np.array([1]), np.array([1]), [(1, 5)] * 2)
    np.testing.assert_allclose(gain, [[0.5]])


def test_ratings_matrix_from_table() -> None:
    table = pd.DataFrame({"malignancy": [4.5, 2.0], "subtlety": pd.array([5, None], dtype="Int8"), "label": [1, 0]})
    ratings = m.ratings_matrix(table)
    assert ratings.shape == (2, 9)
    assert ratings[0, m.RATING_NAMES.index("subtlety")] == 5.0
    assert np.isnan(ratings[1, m.RATING_NAMES.index("subtlety")])  # null cell
    assert np.isnan(ratings[:, m.RATING_NAMES.index("margin")]).all()  # missing column
    np.testing.assert_allclose(ratings[:, -1], [4.5, 2.0])


def test_rating_names_follow_the_annotation_order() -> None:
    from nodule_pipeline.lidc.annotations import CHARACTERISTICS

    assert m.RATING_NAMES == CHARACTERISTICS
    assert set(m.LIDC_SCALES) == set(CHARACTERISTICS)


# --------------------------------------------------------------------------- spread


def test_bootstrap_interval() -> None:
    values = np.array([0.0, 0.2, 0.5, 0.5, 0.7, 0.9, 1.0, 1.0, 0.3, 0.6])
    low, high = m.bootstrap_interval(values, seed=3)
    assert low < values.mean() < high
    assert 0.0 <= low and high <= 1.0
    assert m.bootstrap_interval(values, seed=3) == (low, high)  # deterministic with a seed
    assert m.bootstrap_interval(values, seed=4) != (low, high)
    narrow_low, narrow_high = m.bootstrap_interval(values, confidence=0.5, seed=3)
    assert low <= narrow_low <= narrow_high <= high
    assert m.bootstrap_interval([0.7], seed=0) == (0.7, 0.7)  # one query: no spread
    assert m.bootstrap_interval(np.full(5, 0.25)) == pytest.approx((0.25, 0.25))
    with pytest.raises(ValueError):
        m.bootstrap_interval([])
    with pytest.raises(ValueError):
        m.bootstrap_interval([0.1, np.nan])


def test_mean_std() -> None:
    assert m.mean_std([0.9]) == (0.9, 0.0)
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; ddof=1 -> sqrt(5/3)
    mean, std = m.mean_std(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(5 / 3))
    with pytest.raises(ValueError):
        m.mean_std([])


def test_reader_agreement_compares_each_reader_with_the_median_of_the_others() -> None:
    table = pd.DataFrame(
        {
            "nodule_id": ["A", "B", "C"],
            "label": [1, 0, 1],
            # 0: that reader did not mark the nodule
            "reader_malignancy": [[5, 5, 4, 1], [2, 3, 4, 0], [1, 5, 0, 0]],
        }
    )
    agreement = m.reader_agreement(table)
    # A: 5 vs median(5,4,1)=4 yes, 5 yes, 4 vs median(5,5,1)=5 yes, 1 vs median(5,5,4)=5 no.
    # B: 2 vs median(3,4)=3.5 (malignant) no, the 3 makes no call, 4 vs median(2,3)=2.5 (benign) no.
    # C: two readers, so no reader has two others to be compared with.
    assert (agreement.calls, agreement.agreeing, agreement.nodules) == (6, 3, 2)
    assert agreement.rate == pytest.approx(0.5)
    assert agreement.rows.tolist() == [True, True, False]
    summary = agreement.summary(table["label"].to_numpy(), {"model": np.array([1, 1, 0])})
    assert summary["model_accuracy"] == {"model": 0.5}  # right on A, wrong on B; C is not counted
    assert summary["rows"] == 2 and summary["min_readers"] == 3


def test_reader_agreement_of_a_pipeline_table_counts_the_dropped_rating_3_readers() -> None:
    """The pipeline keeps one row per annotation rated 1, 2, 4 or 5: a nodule's other readers
    rated it 3, and they still move the median the kept readers are compared with."""
    per_annotation = pd.DataFrame(
        {
            "nodule_id": ["X", "X", "X", "Y", "Y"],
            "label": [1, 1, 0, 0, 0],
            "malignancy": [4.0, 5.0, 1.0, 2.0, 2.0],
            "nodule_readers": [4, 4, 4, 2, 2],
        }
    )
    # X was read 4, 5, 1 and 3 (dropped): 4 and 5 face a median of 3 (no call), 1 faces 4 (no).
    agreement = m.reader_agreement(per_annotation)
    assert (agreement.calls, agreement.agreeing, agreement.nodules) == (1, 0, 1)
    assert agreement.rows.tolist() == [True, True, True, False, False]
    as_lists = pd.DataFrame({"nodule_id": ["X", "Y"], "reader_malignancy": [[4, 5, 1, 3], [2, 2, 0, 0]]})
    same = m.reader_agreement(as_lists)
    assert (same.calls, same.agreeing, same.nodules) == (agreement.calls, agreement.agreeing, agreement.nodules)
    unknown_count = per_annotation.assign(nodule_readers=np.nan)  # an external table: only the rows are known
    assert m.reader_agreement(unknown_count).calls == 2  # X read 4, 5, 1: 5 against 2.5 and 1 against 4.5


def test_reader_agreement_needs_the_readers_ratings() -> None:
    assert m.reader_agreement(pd.DataFrame({"nodule_id": ["A"], "malignancy": [4.0]})) is None
    nobody_with_three = m.reader_agreement(pd.DataFrame({"nodule_id": ["A"], "reader_malignancy": [[4, 5, 0, 0]]}))
    assert nobody_with_three.calls == 0 and math.isnan(nobody_with_three.rate)
