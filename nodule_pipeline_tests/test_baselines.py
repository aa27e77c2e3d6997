"""Baselines (LSH, SH, BRE, ITQ, MLH, KSH, CNNH, DLBHC, DNNH, DPSH; SVM, ELM) on separable generated ROIs,
one CPU thread, small sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nodule_pipeline.hashing.baselines import (
    CLASSIFIER_BASELINES,
    DEEP_HASHING,
    DISPLAY_NAMES,
    HASHING_BASELINES,
    SUPERVISED_HASHING,
    bre,
    cnnh,
    dnnh,
    features,
    fit_classifier_baseline,
    fit_hashing_baseline,
    itq,
    ksh,
    mlh,
    sh,
    svm,
)
from nodule_pipeline.hashing.codes import pack_codes
from nodule_pipeline.hashing.network import normalise_rois
from nodule_pipeline.hashing.search import hamming_distances_batch

EPOCHS = 8  # deep baselines: enough for these data, about a second per fit on one thread


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_rois(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU ROIs on a noisy lung background (-850 HU): label 1 = bright solid blob (~ +30 HU), label 0 =
    faint ring or ground-glass disc (-650..-250 HU); random centre, size and texture; ~40 % label 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    labels = (rng.random(n) < 0.4).astype(np.int64)
    images = np.empty((n, 32, 32), np.float32)
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(12, 20, 2)
        r = np.hypot(yy - cy, xx - cx)
        image = -850.0 + rng.normal(0.0, 60.0, (32, 32))
        if label == 1:
            mask = r < rng.uniform(4, 8)
            image[mask] = rng.uniform(-20, 80) + rng.normal(0.0, 40.0, mask.sum())
        elif rng.random() < 0.5:
            mask = np.abs(r - rng.uniform(5, 9)) < 1.2
            image[mask] = rng.uniform(-450, -250) + rng.normal(0.0, 40.0, mask.sum())
        else:
            mask = r < rng.uniform(4, 9)
            image[mask] = rng.uniform(-650, -450) + rng.normal(0.0, 50.0, mask.sum())
        images[i] = image
    return images, labels


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    images, labels = make_rois(300, seed=0)
    return {"x_train": images[:200], "y_train": labels[:200], "x_test": images[200:], "y_test": labels[200:]}


_models: dict[tuple[str, int, int], object] = {}


def fitted(name: str, bits: int, data: dict[str, np.ndarray], seed: int = 0):
    """Fit once per (method, bits, seed) for the whole module: the deep ones are the slow part."""
    key = (name, bits, seed)
    if key not in _models:
        _models[key] = fit_hashing_baseline(name, data["x_train"], data["y_train"], bits, seed, epochs=EPOCHS)
    return _models[key]


def precision_at_k(query_codes, query_labels, db_codes, db_labels, k: int = 10) -> float:
    """Mean P@k by Hamming distance, ties to the lower database row (DESIGN section 6)."""
    distances = hamming_distances_batch(pack_codes(query_codes), pack_codes(db_codes))
    top = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return float((db_labels[top] == query_labels[:, None]).mean())


def chance_precision(query_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """Expected P@k of a random ranking: per query, the share of its class in the database."""
    share = {c: np.mean(db_labels == c) for c in np.unique(query_labels)}
    return float(np.mean([share[c] for c in query_labels]))


def test_registries_are_complete():
    assert list(HASHING_BASELINES) == ["lsh", "sh", "bre", "itq", "mlh", "ksh", "cnnh", "dlbhc", "dnnh", "dpsh"]
    assert DEEP_HASHING == {"cnnh", "dlbhc", "dnnh", "dpsh"}
    assert SUPERVISED_HASHING == {"mlh", "ksh", "cnnh", "dlbhc", "dnnh", "dpsh"}
    assert set(CLASSIFIER_BASELINES) == {"svm", "elm"}
    assert DEEP_HASHING <= set(HASHING_BASELINES) and SUPERVISED_HASHING <= set(HASHING_BASELINES)
    assert set(DISPLAY_NAMES) == set(HASHING_BASELINES) | set(CLASSIFIER_BASELINES)
    with pytest.raises(ValueError, match="unknown hashing baseline"):
        fit_hashing_baseline("sdh", np.zeros((4, 32, 32)), np.array([0, 1, 0, 1]), 32)
    with pytest.raises(ValueError, match="unknown classifier baseline"):
        fit_classifier_baseline("knn", np.zeros((4, 32, 32)), np.array([0, 1, 0, 1]))


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("name", list(HASHING_BASELINES))
def test_hashing_baseline_codes_and_retrieval(name: str, bits: int, data):
    model = fitted(name, bits, data)
    assert model.bits == bits
    db = model.encode(data["x_train"])
    queries = model.encode(data["x_test"])
    assert db.shape == (200, bits) and queries.shape == (100, bits)
    assert db.dtype == np.bool_ and queries.dtype == np.bool_
    assert model.encode(data["x_test"][:0]).shape == (0, bits)
    assert 0.05 < db.mean() < 0.95, "codes are (nearly) constant"
    precision = precision_at_k(queries, data["y_test"], db, data["y_train"])
    chance = chance_precision(data["y_test"], data["y_train"])
    assert precision > chance + 0.2, f"{name} {bits} bits: P@10 {precision:.3f} vs chance {chance:.3f}"


@pytest.mark.parametrize("name", list(HASHING_BASELINES))
def test_hashing_baseline_is_deterministic_for_a_seed(name: str, data):
    first = fitted(name, 32, data).encode(data["x_test"])
    again = fit_hashing_baseline(name, data["x_train"], data["y_train"], 32, 0, epochs=EPOCHS)
    np.testing.assert_array_equal(again.encode(data["x_test"]), first)


@pytest.mark.parametrize("name", ["lsh", "bre", "itq", "mlh"])
def test_shallow_seed_changes_the_codes(name: str, data):
    first = fitted(name, 32, data).encode(data["x_test"])
    other = fitted(name, 32, data, seed=1).encode(data["x_test"])
    assert not np.array_equal(first, other)


def test_ksh_seed_picks_anchors_and_labelled_rows(data):
    """With fewer anchors / labelled rows than training ROIs the seed matters (with 200 ROIs and the
    defaults 300 / 1000 every row is used and the seed has no effect)."""
    fits = [ksh.fit(data["x_train"], data["y_train"], 32, seed, n_anchors=60, n_labelled=120) for seed in (0, 0, 1)]
    assert fits[0].anchors.shape == (60, 1024)
    codes = [model.encode(data["x_test"]) for model in fits]
    np.testing.assert_array_equal(codes[0], codes[1])
    assert not np.array_equal(codes[0], codes[2])


@pytest.mark.parametrize("name", list(CLASSIFIER_BASELINES))
def test_classifier_beats_chance(name: str, data):
    model = fit_classifier_baseline(name, data["x_train"], data["y_train"], seed=0)
    predicted = model.predict(data["x_test"])
    assert predicted.shape == (100,) and np.issubdtype(predicted.dtype, np.integer)
    majority = max(np.mean(data["y_test"] == 0), np.mean(data["y_test"] == 1))
    accuracy = float(np.mean(predicted == data["y_test"]))
    assert accuracy > max(majority + 0.15, 0.85), f"{name}: accuracy {accuracy:.3f}, majority {majority:.3f}"
    assert model.predict(data["x_test"][:0]).shape == (0,)
    again = fit_classifier_baseline(name, data["x_train"], data["y_train"], seed=0).predict(data["x_test"])
    np.testing.assert_array_equal(again, predicted)


def test_dlbhc_also_classifies(data):
    model = fitted("dlbhc", 32, data)
    assert np.mean(model.predict(data["x_test"]) == data["y_test"]) > 0.85


def test_non_hu_inputs_use_the_percentile_map(data):
    """ROIs on a 0..255 scale (not HU) go through the same normalisation rule as the network's."""
    scaled = (data["x_train"] + 1000.0) / 8.0
    model = fit_hashing_baseline("itq", scaled, data["y_train"], 32, 0)
    assert model.features.normalisation.mode == "percentile"
    queries = model.encode((data["x_test"] + 1000.0) / 8.0)
    precision = precision_at_k(queries, data["y_test"], model.encode(scaled), data["y_train"])
    assert precision > chance_precision(data["y_test"], data["y_train"]) + 0.2


def test_bad_inputs_are_refused(data):
    with pytest.raises(ValueError, match="labels"):
        fit_hashing_baseline("lsh", data["x_train"], data["y_train"][:-1], 32)
    with pytest.raises(ValueError, match="bits"):
        fit_hashing_baseline("lsh", data["x_train"], data["y_train"], 0)
    with pytest.raises(ValueError, match="two classes"):
        fit_classifier_baseline("svm", data["x_train"], np.zeros(200, dtype=int))
    with pytest.raises(ValueError, match="epochs"):
        fit_hashing_baseline("dpsh", data["x_train"], data["y_train"], 32, epochs=0)


# --------------------------------------------------------------------------- the pieces, against their maths


def test_pca_basis_is_orthonormal_sorted_and_sign_fixed():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)) * np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    x -= x.mean(axis=0)
    vectors, variances = features.pca_basis(x, 6)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(6), atol=1e-10)
    assert np.all(np.diff(variances) <= 0)
    pivots = np.abs(vectors).argmax(axis=0)
    assert np.all(vectors[pivots, np.arange(6)] > 0)
    with pytest.raises(ValueError, match="n_components"):
        features.pca_basis(x, 7)


def test_itq_rotation_is_orthogonal_and_lowers_quantisation_loss():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8))
    start = itq.random_rotation(8, rng)

    def loss(rotation):
        projected = v @ rotation
        return float(np.sum((np.where(projected >= 0, 1.0, -1.0) - projected) ** 2))

    rotation = itq.itq_rotation(v, start, iterations=50)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(8), atol=1e-10)
    assert loss(rotation) < loss(start)


def test_spectral_hashing_gives_the_widest_direction_the_lowest_frequency(data):
    model = sh.fit(data["x_train"], data["y_train"], 32)
    v = model.features.transform(data["x_train"])
    span = v.max(axis=0) - v.min(axis=0)
    assert model.directions[0] == span.argmax()
    assert model.omegas[0] == pytest.approx(np.pi / span.max())
    assert np.all(np.diff(model.omegas) >= 0)
    assert len(set(zip(model.directions.tolist(), model.omegas.tolist()))) == 32  # no mode twice


def test_svm_newton_solution_meets_the_optimality_conditions():
    """Squared-hinge optimum: beta_i = 2C y_i max(0, 1 - y_i f_i) for every i, and sum beta = 0."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1.0, 1.0, (30, 2)), rng.normal(1.0, 1.0, (30, 2))])
    y = np.repeat([-1.0, 1.0], 30)
    k = svm._kernel(x, x, "rbf", 0.5)
    beta, bias = svm.train_binary(k, y, c=2.0)
    f = k @ beta + bias
    np.testing.assert_allclose(beta, 2 * 2.0 * y * np.maximum(0.0, 1.0 - y * f), atol=1e-8)
    assert abs(beta.sum()) < 1e-8


def test_bre_coordinate_step_is_the_exact_line_minimum():
    """The step BRE takes along one weight is at least as good as the best of a fine grid of steps."""
    rng = np.random.default_rng(0)
    rows, anchors, bits = 30, 5, 6
    k = rng.standard_normal((rows, anchors))
    target = rng.random((rows, rows))
    target = np.triu(target, 1) + np.triu(target, 1).T

    def objective(weights: np.ndarray) -> float:
        codes = np.where(k @ weights > 0, 1.0, -1.0)
        return float(np.sum(np.triu(target - (bits - codes @ codes.T) / (2 * bits), 1) ** 2))

    weights = rng.standard_normal((anchors, bits))
    for p, q in [(0, 0), (1, 3), (5, 2), (2, 4), (3, 1)]:
        scores = k @ weights
        codes = np.where(scores > 0, 1.0, -1.0)
        residual = target - (bits - codes @ codes.T) / (2 * bits)
        np.fill_diagonal(residual, 0.0)
        step = bre.coordinate_step(scores[:, p], k[:, q], codes[:, p], residual, bits)
        moved = weights.copy()
        moved[q, p] += step
        grid = []
        for delta in np.linspace(-10.0, 10.0, 2001):
            trial = weights.copy()
            trial[q, p] += delta
            grid.append(objective(trial))
        assert objective(moved) <= min(grid) + 1e-12
        weights = moved


@pytest.mark.parametrize("bits", [32, 64])
def test_bre_training_reconstructs_the_distances_better_than_its_start(bits: int, data):
    """With 200 ROIs every row is paired (n_pairs_rows=400): the fitted codes' squared error against the
    normalised input distances is well below that of the Gaussian start (the same seed, no sweeps)."""

    def error(model) -> float:
        x = model.features.transform(data["x_train"])
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        target = np.maximum(1.0 - unit @ unit.T, 0.0)
        target /= target.max()
        codes = model.encode(data["x_train"]).astype(np.float64)
        hamming = (codes @ (1 - codes).T + (1 - codes) @ codes.T) / bits
        return float(np.sum(np.triu(target - hamming, 1) ** 2))

    start = bre.fit(data["x_train"], data["y_train"], bits, 0, sweeps=0)
    assert error(fitted("bre", bits, data)) < 0.5 * error(start)


def test_mlh_loss_augmented_inference_is_exact():
    """Against brute force over every pair of 4-bit codes, for similar and dissimilar pairs."""
    rng = np.random.default_rng(0)
    cube = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
    for trial in range(20):
        a, b = rng.standard_normal((1, 4)), rng.standard_normal((1, 4))
        similar = np.array([trial % 2 == 0])
        g, g_other = mlh.loss_augmented_codes(a, b, similar, rho=2.0, lam=0.5)
        values = mlh.hinge_loss((cube[:, None] != cube[None]).sum(-1), similar[0], 2.0, 0.5)
        values = values + (cube @ a[0])[:, None] + (cube @ b[0])[None, :]  # every (g, g') of the cube
        found = mlh.hinge_loss(np.sum(g != g_other), similar[0], 2.0, 0.5) + g[0] @ a[0] + g_other[0] @ b[0]
        assert found == pytest.approx(values.max(), abs=1e-12)


def test_mlh_pairs_are_half_similar():
    labels = np.array([0, 0, 0, 1, 1, 2])
    i, j = mlh.sample_pairs(labels, 400, np.random.default_rng(0))
    assert np.all(labels[i[:200]] == labels[j[:200]]) and np.all(labels[i[200:]] != labels[j[200:]])


@pytest.mark.parametrize("bits", [32, 64])
def test_mlh_training_lowers_its_pair_loss(bits: int, data):
    """The hinge loss over all training pairs of the fitted codes is well below the Gaussian start's."""
    same = data["y_train"][:, None] == data["y_train"][None, :]

    def loss(model) -> float:
        codes = model.encode(data["x_train"]).astype(np.int64)
        distances = codes @ (1 - codes).T + (1 - codes) @ codes.T
        return float(np.mean(mlh.hinge_loss(distances, same, max(1.0, round(bits / 4)), 0.5)))

    start = mlh.fit(data["x_train"], data["y_train"], bits, 0, iterations=0)
    assert loss(fitted("mlh", bits, data)) < 0.5 * loss(start)


def test_cnnh_stage_one_codes_fit_the_label_similarity():
    """Two classes: H H^T = bits * S exactly (one code and its complement). More classes: one code a
    class, and closer to bits * S than independent random class codes are."""
    labels = np.array([0, 1, 1, 0, 1, 1, 1])
    similarity = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)
    for bits in (1, 3, 32):
        codes = cnnh.approximate_codes(labels, bits)
        assert codes.shape == (7, bits) and set(np.unique(codes)) <= {-1.0, 1.0}
        np.testing.assert_array_equal(codes @ codes.T, bits * similarity)
    labels = np.repeat(np.arange(5), [3, 5, 2, 7, 4])
    similarity = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)
    codes = cnnh.approximate_codes(labels, 32)
    assert all(len(np.unique(codes[labels == c], axis=0)) == 1 for c in range(5))
    random_codes = np.random.default_rng(0).choice([-1.0, 1.0], (5, 32))[labels]
    assert np.sum((codes @ codes.T - 32 * similarity) ** 2) < 0.8 * np.sum(
        (random_codes @ random_codes.T - 32 * similarity) ** 2
    )


def test_cnnh_network_reproduces_its_stage_one_codes(data):
    codes = fitted("cnnh", 32, data).encode(data["x_train"])
    target = cnnh.approximate_codes(data["y_train"], 32) > 0
    assert np.mean(codes == target) > 0.95


def test_dnnh_slices_reach_only_their_own_bits():
    torch.manual_seed(0)
    layer = dnnh.DivideAndEncode(16, 8, slices=4)  # 4 features -> 2 bits a slice
    x = torch.randn(3, 16, requires_grad=True)
    layer(x)[:, 2:4].sum().backward()  # slice 1's bits
    touched = (x.grad.abs().sum(dim=0) > 0).numpy()
    np.testing.assert_array_equal(touched, np.arange(16) // 4 == 1)
    with pytest.raises(ValueError, match="slices"):
        dnnh.DivideAndEncode(16, 6, slices=4)


def test_dnnh_triplet_loss_and_threshold():
    codes = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # rows 0, 1 similar, row 2 the other class
    labels = torch.tensor([0, 0, 1])
    # triplets (0, 1, 2): max(0, 1 - 2 + 1) = 0; (1, 0, 2): max(0, 1 - 1 + 1) = 1
    assert float(dnnh.triplet_ranking_loss(codes, labels)) == pytest.approx(0.5)
    assert float(dnnh.triplet_ranking_loss(codes, torch.tensor([1, 1, 1]))) == 0.0
    threshold = dnnh.PiecewiseThreshold(0.1)
    np.testing.assert_allclose(threshold(torch.tensor([0.3, 0.45, 0.55, 0.7])).numpy(), [0.0, 0.45, 0.55, 1.0])


def test_dnnh_training_lowers_the_triplet_loss(data):
    """On the training ROIs, the fitted net's triplet loss is well below that of the same net untrained."""
    images = torch.from_numpy(normalise_rois(data["x_train"])[0])
    labels = torch.from_numpy(data["y_train"])
    untrained = dnnh.fit(data["x_train"], data["y_train"], 32, 0, epochs=1, learning_rate=0.0)
    losses = []
    for model in (untrained, fitted("dnnh", 32, data)):
        with torch.inference_mode():
            codes, _ = model.module(images)
        losses.append(float(dnnh.triplet_ranking_loss(codes, labels)))
    assert losses[1] < 0.5 * losses[0]
