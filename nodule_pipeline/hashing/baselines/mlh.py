"""MLH: minimal loss hashing (Norouzi & Fleet, ICML 2011), supervised by pairs (similar = same label).

Bit j = sgn(w_j . x + c_j), affine on the 1024 centred normalised pixels (the same features as KSH
and BRE), divided by their mean training norm so the learning rate does not depend on the ROI
scale. The loss on a pair at Hamming distance m is the paper's hinge: lambda * max(m - rho + 1, 0)
for similar pairs, max(rho - m + 1, 0) for dissimilar ones. It is not differentiable in W, so
MLH minimises the structured-prediction upper bound

    max_{g, g'} [loss(||g - g'||_H) + g.Wx + g'.Wx'] - max_h h.Wx - max_h' h'.Wx',

whose subgradient is (g - h) x^T + (g' - h') x'^T. The loss-augmented maximisation is exact: per
bit, agreeing is worth |a + a'| and differing |a - a'| (a = Wx); for each m the m bits that gain
most by differing are chosen, and the best m wins. Training is stochastic gradient descent with
momentum and weight decay on mini-batches of pairs, half of them similar (drawn with ``seed``),
from a Gaussian (LSH) start. Simplified: rho = bits / 4 and lambda = 0.5 are fixed rather than
validated per code length, as the paper does.
"""

from __future__ import annotations

import numpy as np

from nodule_pipeline.hashing.baselines.features import (
    ProjectionHash,
    check_bits,
    check_training_inputs,
    fit_feature_map,
)


def hinge_loss(distances: np.ndarray, similar: np.ndarray, rho: float, lam: float) -> np.ndarray:
    """The paper's pair loss at Hamming distances ``distances`` (broadcast against ``similar``)."""
    return np.where(similar, lam * np.maximum(distances - rho + 1.0, 0.0), np.maximum(rho - distances + 1.0, 0.0))


def loss_augmented_codes(
    a: np.ndarray, b: np.ndarray, similar: np.ndarray, rho: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """argmax_{g, g'} loss(||g - g'||_H, s) + g.a + g'.b per pair, exactly; a, b (P, bits) -> +-1 codes."""
    agree, differ = np.abs(a + b), np.abs(a - b)
    gain = differ - agree
    order = np.argsort(-gain, axis=1, kind="stable")
    prefix = np.concatenate([np.zeros((len(a), 1)), np.cumsum(np.take_along_axis(gain, order, axis=1), axis=1)], 1)
    distances = np.arange(a.shape[1] + 1, dtype=np.float64)
    best = np.argmax(prefix + hinge_loss(distances[None, :], similar[:, None], rho, lam), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(a.shape[1])[None, :], axis=1)
    differs = ranks < best[:, None]
    g = np.where(differs, np.sign(a - b), np.sign(a + b))
    g = np.where(g == 0.0, 1.0, g)
    return g, np.where(differs, -g, g)


def sample_pairs(labels: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``size`` pairs (i, j): the first half with j in i's class, the rest with j in another class (if any)."""
    order = np.argsort(labels, kind="stable")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    i = rng.integers(len(labels), size=size)
    c = inverse[i]
    j = order[starts[c] + (rng.random(size) * counts[c]).astype(np.int64)]
    other = len(labels) - counts[c]
    half = np.arange(size) >= size // 2
    position = (rng.random(size) * np.maximum(other, 1)).astype(np.int64)
    position = np.where(position >= starts[c], position + counts[c], position)  # skip i's class block
    j = np.where(half & (other > 0), order[np.minimum(position, len(labels) - 1)], j)  # one class: keep j
    return i, j


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    bits: int,
    seed: int = 0,
    iterations: int = 500,
    batch_pairs: int = 100,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lam: float = 0.5,
) -> ProjectionHash:
    """SGD on the loss-augmented bound; pairs, the start and the order all come from ``seed``."""
    labels = check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    rng = np.random.default_rng(seed)
    feature_map, x = fit_feature_map(train_images)
    scale = float(np.linalg.norm(x, axis=1).mean()) or 1.0
    x = np.column_stack([x / scale, np.ones(len(x))])  # the last weight row is the bias
    rho = max(1.0, round(bits / 4))
    weights = 0.1 * rng.standard_normal((x.shape[1], bits))
    velocity = np.zeros_like(weights)
    for _ in range(iterations):
        i, j = sample_pairs(labels, batch_pairs, rng)
        rows = x[np.concatenate([i, j])]
        scores = rows @ weights
        a, b = scores[:batch_pairs], scores[batch_pairs:]
        augmented = np.concatenate(loss_augmented_codes(a, b, labels[i] == labels[j], rho, lam))
        gradient = rows.T @ (augmented - np.where(scores > 0.0, 1.0, -1.0)) / batch_pairs + weight_decay * weights
        velocity = momentum * velocity - learning_rate * gradient
        weights += velocity
    return ProjectionHash(feature_map, weights[:-1] / scale, "mlh", offset=weights[-1].copy())
