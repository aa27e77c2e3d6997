"""The readers' ratings in training and search: their encoding against the report's graded gain,
the rating terms of the objective, a model trained with them, and the rating re-rank."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from nodule_pipeline.hashing.characteristics import (
    ENCODED_WIDTH,
    encode_ratings,
    rating_distances,
    rating_loss,
    rating_probabilities,
    rating_similarity,
)
from nodule_pipeline.hashing.index import build_index
from nodule_pipeline.hashing.metrics import LIDC_SCALES, RATING_NAMES, graded_gain
from nodule_pipeline.hashing.network import NetworkConfig
from nodule_pipeline.hashing.objective import ObjectiveWeights, hashing_objective, pairwise_term
from nodule_pipeline.hashing.search import RATING_POOL_FACTOR, fold_batch, search, search_batch
from nodule_pipeline.hashing.training import TrainConfig, encode, load_model, save_model, train_hash_model
from nodule_pipeline_tests.test_hashing_network import FAST, SMALL, make_rois

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_ratings(rng: np.random.Generator, n: int, missing: float = 0.0) -> np.ndarray:
    """Ratings on each LIDC scale, a share of them missing."""
    columns = [rng.integers(LIDC_SCALES[name].low, LIDC_SCALES[name].high + 1, n) for name in RATING_NAMES]
    ratings = np.stack(columns, axis=1).astype(np.float64)
    ratings[rng.random(ratings.shape) < missing] = np.nan
    return ratings


def test_reader_encodings_are_one_distance_apart_exactly_as_the_report_grades_them() -> None:
    rng = np.random.default_rng(0)
    ratings = random_ratings(rng, 40, missing=0.2)
    encoded = encode_ratings(ratings)
    assert encoded.shape == (40, ENCODED_WIDTH) == (40, 45)
    labels = np.zeros(40)
    gain = graded_gain(ratings, ratings, labels, labels)
    distance = rating_distances(encoded, encoded)
    shared = (np.isfinite(ratings)[:, None, :] & np.isfinite(ratings)[None, :, :]).any(axis=2)
    np.testing.assert_allclose(distance[shared], 1 - gain[shared], atol=1e-6)
    assert np.isnan(distance[~shared]).all()
    # the torch similarity of the pairwise term is the same figure, times "same label"
    same = torch.from_numpy((rng.random((40, 40)) < 0.5).astype(np.float32))
    similarity = rating_similarity(torch.from_numpy(encoded), same).numpy()
    np.testing.assert_allclose(similarity[shared], (same.numpy() * gain)[shared], atol=1e-6)
    np.testing.assert_array_equal(similarity[~shared], same.numpy()[~shared])  # no ratings: the label alone


def test_a_prediction_is_scored_by_its_expected_distance() -> None:
    reader = encode_ratings(np.array([[3, 1, 6, 4, 3, 3, 1, 5, 2]], dtype=float))
    spiculation = next(i for i, name in enumerate(RATING_NAMES) if name == "spiculation")
    start = int(sum(LIDC_SCALES[n].high - LIDC_SCALES[n].low + 1 for n in RATING_NAMES[:spiculation]))
    unsure = reader.copy()
    unsure[0, start : start + 5] = [0.5, 0, 0, 0, 0.5]  # half "1", half "5" where the reader said 1
    # expected |level - 1| / 4 = 0.5 * 0 + 0.5 * 1 on one of nine ratings
    assert rating_distances(unsure, reader)[0, 0] == pytest.approx(0.5 / 9)
    # a median between two levels is split between them: 3.5 is half a step from both 3 and 4
    between = encode_ratings(np.array([[3.5, 1, 6, 4, 3, 3, 1, 5, 2]]))
    assert rating_distances(between, reader)[0, 0] == pytest.approx(0.5 * 0.25 / 9)
    # an off-scale categorical value is missing, not a category
    assert np.isnan(encode_ratings(np.array([[3, 9, 6, 4, 3, 3, 1, 5, 2]]))[0, 5:9]).all()


def test_the_rating_head_loss_is_a_per_rating_cross_entropy() -> None:
    ratings = encode_ratings(np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1], [5, 4, 6, 5, 5, 5, 5, 5, np.nan]]))
    confident = torch.from_numpy(np.nan_to_num(ratings) * 40 - 20)
    assert float(rating_loss(confident, torch.from_numpy(ratings))) < 1e-6
    uniform = torch.zeros(2, ENCODED_WIDTH)
    levels = [LIDC_SCALES[n].high - LIDC_SCALES[n].low + 1 for n in RATING_NAMES]
    expected = (sum(np.log(levels)) * 2 - np.log(levels[-1])) / 17  # 17 ratings present
    assert float(rating_loss(uniform, torch.from_numpy(ratings))) == pytest.approx(expected, rel=1e-6)
    assert float(rating_loss(uniform, torch.full((2, ENCODED_WIDTH), float("nan")))) == 0.0
    np.testing.assert_allclose(rating_probabilities(torch.randn(3, ENCODED_WIDTH)).sum(1).numpy(), 9, rtol=1e-6)


def test_the_graded_similarity_changes_which_codes_the_pairwise_term_prefers() -> None:
    """Three benign nodules: B described like A, C unlike A. With labels alone the term cannot
    tell "A near B" from "A near C"; the graded similarity prefers A near B, and one gradient
    step from equal codes puts B closer to A than C."""
    rows = [[2, 1, 6, 4, 2, 1, 1, 5, 1], [2, 1, 6, 4, 2, 1, 1, 5, 2], [5, 1, 3, 1, 5, 5, 5, 1, 2]]
    ratings = torch.from_numpy(encode_ratings(np.array(rows, dtype=float)))
    labels = torch.tensor([0, 0, 0])
    a, b = torch.ones(16), torch.ones(16)
    b[8:] = -1
    near_b = torch.stack([a, a, b])
    near_c = torch.stack([a, b, a])
    assert float(pairwise_term(near_b, labels)) == pytest.approx(float(pairwise_term(near_c, labels)))
    assert float(pairwise_term(near_b, labels, ratings)) < float(pairwise_term(near_c, labels, ratings))

    u = torch.zeros(3, 16)
    u[:, 0] = 0.1
    u.requires_grad_(True)
    pairwise_term(torch.tanh(u * 3), labels, ratings).backward()
    stepped = torch.tanh((u - 5.0 * u.grad) * 3).detach()
    assert float(stepped[0] @ stepped[1]) > float(stepped[0] @ stepped[2])


def test_the_objective_leaves_the_rating_terms_out_without_ratings() -> None:
    torch.manual_seed(0)
    logits, probs = torch.randn(4, 2), torch.rand(4, 32)
    labels = torch.tensor([0, 1, 0, 1])
    head = torch.randn(4, ENCODED_WIDTH)
    targets = torch.from_numpy(encode_ratings(random_ratings(np.random.default_rng(1), 4)))
    plain = ObjectiveWeights(pairwise=1.0)
    rated = ObjectiveWeights(pairwise=1.0, ratings=2.0, graded_pairwise=True)
    base, _ = hashing_objective(logits, probs, labels, plain)
    assert float(hashing_objective(logits, probs, labels, rated)[0]) == pytest.approx(float(base))
    total, cross_entropy = hashing_objective(logits, probs, labels, rated, None, head, targets)
    u = 2 * probs - 1
    expected = cross_entropy + pairwise_term(u, labels, targets) + 2.0 * rating_loss(head, targets)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


def _rated_rois(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The network tests' separable ROIs with ratings that follow the picture: solid blobs rated
    spherical and smooth, rings lobulated and spiculated."""
    images, labels, patients = make_rois(n_patients=20, per_patient=5, seed=seed)
    rng = np.random.default_rng(seed)
    ratings = random_ratings(rng, len(labels))
    for name, benign, malignant in (("sphericity", 5, 2), ("spiculation", 1, 5), ("lobulation", 1, 4)):
        ratings[:, RATING_NAMES.index(name)] = np.where(labels == 0, benign, malignant)
    return images, labels, patients, ratings


def test_a_model_trained_with_ratings_predicts_them_and_keeps_its_head_through_save_and_load(tmp_path) -> None:
    images, labels, patients, ratings = _rated_rois()
    network = NetworkConfig(bits=32, **SMALL)
    recipe = TrainConfig(**FAST, ratings_weight=1.0)
    model = train_hash_model(images, labels, patients, network, recipe, ratings=ratings)
    assert model.network.rating_outputs == ENCODED_WIDTH
    encoded = encode(model, images)
    assert encoded.ratings.shape == (len(images), ENCODED_WIDTH)
    np.testing.assert_allclose(encoded.ratings.sum(axis=1), 9, rtol=1e-5)
    # the ratings that follow the picture are learnt: predicted distance to the truth beats a guess
    truth = encode_ratings(ratings)
    learnt = np.diag(rating_distances(encoded.ratings, truth)).mean()
    shuffled = np.diag(rating_distances(encoded.ratings, truth[np.random.default_rng(0).permutation(len(truth))]))
    assert learnt < shuffled.mean() - 0.03
    save_model(model, tmp_path / "model")
    loaded = encode(load_model(tmp_path / "model"), images[:5])
    np.testing.assert_array_equal(loaded.ratings, encoded.ratings[:5])

    # no ratings in the table, or a recipe that does not weigh them: no head, as before
    for unrated in (
        train_hash_model(images, labels, patients, network, recipe),
        train_hash_model(images, labels, patients, network, replace(recipe, ratings_weight=0.0), ratings=ratings),
        train_hash_model(images, labels, patients, network, recipe, ratings=np.full(ratings.shape, np.nan)),
    ):
        assert unrated.network.rating_outputs == 0 and encode(unrated, images[:2]).ratings is None


def _rated_index(ratings: np.ndarray | None):
    """Eight benign items with equal codes, fc distance growing with the row, so the Euclidean
    order is 0, 1, 2, ... ; two malignant items far away."""
    n = 10
    codes = np.zeros((n, 16), dtype=bool)
    codes[8:] = True
    fc = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 4), dtype=np.float32)
    labels = np.array([0] * 8 + [1, 1])
    items = pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)], "nodule_id": [f"N{i}" for i in range(n)]})
    if ratings is not None:
        items = items.assign(**{name: ratings[:, j] for j, name in enumerate(RATING_NAMES)})
    return build_index(codes, fc, labels, items, "m")


def test_the_hierarchical_search_ranks_its_pool_by_expected_rating_distance() -> None:
    rng = np.random.default_rng(3)
    ratings = random_ratings(rng, 10)
    index = _rated_index(ratings)
    wanted = 6
    query = encode_ratings(ratings[wanted : wanted + 1])[0]
    code, fc = np.zeros(16, dtype=bool), np.full(4, -1, dtype=np.float32)  # no item's own image
    hits = search(index, code, fc, 0, k=3, query_ratings=query)
    assert hits[0].nodule_id == f"N{wanted}" and hits[0].rating_distance == pytest.approx(0.0)
    distances = rating_distances(query[None], encode_ratings(ratings[:8]))[0]
    assert [h.rating_distance for h in hits] == pytest.approx(np.sort(distances)[:3].tolist())
    assert [h.label for h in hits] == [0, 0, 0]  # the class gate stays

    # without query ratings, in the other modes, or on a library without ratings: the fc order
    euclidean = ["N0", "N1", "N2"]
    assert [h.nodule_id for h in search(index, code, fc, 0, k=3)] == euclidean
    assert [h.nodule_id for h in search(index, code, fc, 0, k=3, mode="rerank", query_ratings=query)] == euclidean
    plain = search(_rated_index(None), code, fc, 0, k=3, query_ratings=query)
    assert [h.nodule_id for h in plain] == euclidean and plain[0].rating_distance is None

    # items without ratings come after every rated one, in fc order
    partly = ratings.copy()
    partly[:4] = np.nan
    order = [h.nodule_id for h in search(_rated_index(partly), code, fc, 0, k=8, query_ratings=query)]
    assert order[4:] == ["N0", "N1", "N2", "N3"]

    # the query's own nodule (same code, features far closer than the pool's) stays first, cut
    # exactly or a little off; a merely nearer item does not
    for near in (3.0, 3.05):
        own = search(index, code, np.full(4, near, np.float32), 0, k=2, query_ratings=query)
        assert [h.nodule_id for h in own] == ["N3", f"N{wanted}"], near
    nearer = search(index, code, np.full(4, 3.5, np.float32), 0, k=1, query_ratings=query)
    assert nearer[0].nodule_id == f"N{wanted}"

    # the batch search agrees, and folding keeps the distances
    batch = search_batch(index, code[None], fc[None], [0], k=3, query_ratings=query[None])
    assert [f"N{r}" for r in batch.rows[0]] == [h.nodule_id for h in hits]
    folded = fold_batch(batch, np.arange(10), 3)
    np.testing.assert_allclose(folded.rating_distance[0], [h.rating_distance for h in hits])
    with pytest.raises(ValueError, match="query_ratings"):
        search(index, code, fc, 0, k=3, query_ratings=np.full(ENCODED_WIDTH, np.nan))


def test_the_rating_pool_is_wider_than_the_euclidean_one() -> None:
    """The item rated like the query stands 10th by Hamming: the Euclidean pool of 2k (k = 1)
    would miss it, the rating pool of 10k holds it, and the 11th is beyond it."""
    rng = np.random.default_rng(4)
    n = 20
    codes = np.zeros((n, 16), dtype=bool)
    for row in range(n):
        codes[row, : min(row, 16)] = True  # Hamming distance from the zero code grows with the row
    ratings = random_ratings(rng, n)
    items = pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)], "nodule_id": [f"N{i:02d}" for i in range(n)]})
    items = items.assign(**{name: ratings[:, j] for j, name in enumerate(RATING_NAMES)})
    index = build_index(codes, np.zeros((n, 4), np.float32), np.zeros(n, int), items, "m")
    code, fc = np.zeros(16, bool), np.ones(4, np.float32)  # N00 has the same code, not the same image
    tenth, eleventh = RATING_POOL_FACTOR - 1, RATING_POOL_FACTOR
    hits = search(index, code, fc, 0, k=1, query_ratings=encode_ratings(ratings[tenth : tenth + 1])[0])
    assert hits[0].nodule_id == f"N{tenth:02d}" and hits[0].hamming == tenth
    beyond = search(index, code, fc, 0, k=1, query_ratings=encode_ratings(ratings[eleventh : eleventh + 1])[0])
    assert beyond[0].hamming < eleventh
