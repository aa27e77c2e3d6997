"""Baselines (LSH, SH, ITQ, KSH, DLBHC, DPSH; SVM, ELM) on separable generated ROIs, one CPU thread, small sizes."""

from __future__ import annotations

import numpy as np
import pytest

from nodule_pipeline.hashing.baselines import (
    CLASSIFIER_BASELINES,
    DEEP_HASHING,
    DISPLAY_NAMES,
    HASHING_BASELINES,
    SUPERVISED_HASHING,
    features,
    fit_classifier_baseline,
    fit_hashing_baseline,
    itq,
    ksh,
    sh,
    svm,
)
from nodule_pipeline.hashing.codes import pack_codes
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
    assert list(HASHING_BASELINES) == ["lsh", "sh", "itq", "ksh", "dlbhc", "dpsh"]
    assert set(CLASSIFIER_BASELINES) == {"svm", "elm"}
    assert DEEP_HASHING <= set(HASHING_BASELINES) and SUPERVISED_HASHING <= set(HASHING_BASELINES)
    assert set(DISPLAY_NAMES) == set(HASHING_BASELINES) | set(CLASSIFIER_BASELINES)
    with pytest.raises(ValueError, match="unknown hashing baseline"):
        fit_hashing_baseline("bre", np.zeros((4, 32, 32)), np.array([0, 1, 0, 1]), 32)
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


@pytest.mark.parametrize("name", ["lsh", "itq"])
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
