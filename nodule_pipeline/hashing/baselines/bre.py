"""BRE: binary reconstructive embedding (Kulis & Darrell, NIPS 2009), unsupervised.

Bit p = sgn(sum_q W_qp kbar_q(x)) over the same centred RBF kernel features as KSH
(:func:`~nodule_pipeline.hashing.baselines.ksh.fit_anchor_kernel`: the 1024 centred normalised
pixels, ``n_anchors`` random training anchors). The weights W are learnt so that the normalised
Hamming distance d_H / bits reconstructs the input distance 0.5 ||x - y||^2 of the unit-norm
centred pixel vectors (divided by its maximum, so both lie in [0, 1]), in squared error summed
over all pairs of ``n_pairs_rows`` random training rows. Labels are not used: the paper's
unsupervised form.

Optimisation as in the paper: W starts Gaussian (kernelised LSH) and one weight W_qp at a time
moves to its exact minimiser along that coordinate; the objective is piecewise constant in the
step, changing only where a row's bit p flips, so all breakpoints are sorted and every prefix of
flips is scored at once. Simplified: one shared anchor set for every bit (the paper draws one per
hash function), all pairs of a row subsample instead of the paper's neighbour pairs, and a fixed
budget of ``sweeps`` x ``updates_per_bit`` coordinates per bit instead of running to convergence.
"""

from __future__ import annotations

import numpy as np

from nodule_pipeline.hashing.baselines.features import check_bits, check_training_inputs, fit_feature_map
from nodule_pipeline.hashing.baselines.ksh import KernelHash, fit_anchor_kernel


def _side_gains(
    breakpoints: np.ndarray, rows: np.ndarray, row_gain: np.ndarray, flip_gain: np.ndarray
) -> tuple[float, float]:
    """Best prefix of the flips on one side of 0: (objective change, step) with ``rows`` ordered by |step|.

    Flipping the set F changes the objective by sum_{i in F, j not in F} G_ij
    = sum_{i in F} row_gain_i - sum_{i != j in F} G_ij, evaluated here for every prefix of ``rows``.
    """
    if len(rows) == 0:
        return 0.0, 0.0
    block = flip_gain[np.ix_(rows, rows)]
    inside = 2.0 * np.tril(block, -1).sum(axis=1)  # pairs with an earlier flipped row, both orders
    change = np.cumsum(row_gain[rows] - inside)
    best = int(np.argmin(change))
    if change[best] >= 0.0:
        return 0.0, 0.0
    here = breakpoints[rows[best]]
    beyond = breakpoints[rows[best + 1]] if best + 1 < len(rows) else 2.0 * here
    return float(change[best]), 0.5 * (here + beyond)


def coordinate_step(
    scores: np.ndarray, column: np.ndarray, codes: np.ndarray, residual: np.ndarray, bits: int
) -> float:
    """The step along one weight that lowers sum_{i<j} residual_ij^2 most (0 if none does).

    ``scores`` (l,) are bit p's pre-sign values, ``column`` (l,) the kernel feature whose weight moves,
    ``codes`` (l,) bit p in +-1 and ``residual`` (l, l) = target - d_H / bits (0 diagonal). Flipping
    row i alone changes residual_ij by -h_i h_j / bits, i.e. the objective by G_ij = 1/bits^2 - 2 R_ij h_i h_j / bits.
    """
    flip_gain = (1.0 / bits - 2.0 * residual * np.outer(codes, codes)) / bits
    np.fill_diagonal(flip_gain, 0.0)
    row_gain = flip_gain.sum(axis=1)
    moving = column != 0.0
    breakpoints = np.zeros_like(scores)
    breakpoints[moving] = -scores[moving] / column[moving]
    positive = np.flatnonzero(moving & (breakpoints > 0.0))
    negative = np.flatnonzero(moving & (breakpoints < 0.0))
    up = _side_gains(breakpoints, positive[np.argsort(breakpoints[positive], kind="stable")], row_gain, flip_gain)
    down = _side_gains(breakpoints, negative[np.argsort(-breakpoints[negative], kind="stable")], row_gain, flip_gain)
    return (up if up[0] <= down[0] else down)[1]


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    bits: int,
    seed: int = 0,
    n_anchors: int = 300,
    n_pairs_rows: int = 400,
    sweeps: int = 2,
    updates_per_bit: int = 10,
) -> KernelHash:
    """Anchors, the paired rows, the starting weights and the coordinates visited all come from ``seed``."""
    check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    rng = np.random.default_rng(seed)
    feature_map, x = fit_feature_map(train_images)
    anchors, sigma, kernel_mean, kernel = fit_anchor_kernel(x, n_anchors, rng)
    rows = np.sort(rng.choice(len(x), size=min(n_pairs_rows, len(x)), replace=False))
    k = kernel[rows]
    unit = x[rows] / np.maximum(np.linalg.norm(x[rows], axis=1, keepdims=True), 1e-12)
    target = np.maximum(1.0 - unit @ unit.T, 0.0)  # 0.5 ||x - y||^2 of unit vectors
    target /= float(target.max()) or 1.0

    weights = rng.standard_normal((k.shape[1], bits))
    scores = k @ weights  # (l, bits)
    codes = np.where(scores > 0.0, 1.0, -1.0)
    residual = target - (bits - codes @ codes.T) / (2.0 * bits)
    np.fill_diagonal(residual, 0.0)
    for _ in range(sweeps):
        for p in range(bits):
            for q in rng.choice(k.shape[1], size=min(updates_per_bit, k.shape[1]), replace=False):
                step = coordinate_step(scores[:, p], k[:, q], codes[:, p], residual, bits)
                if step == 0.0:
                    continue
                weights[q, p] += step
                scores[:, p] += step * k[:, q]
                new = np.where(scores[:, p] > 0.0, 1.0, -1.0)
                residual += (np.outer(new, new) - np.outer(codes[:, p], codes[:, p])) / (2.0 * bits)
                codes[:, p] = new
    return KernelHash(feature_map, anchors, sigma, kernel_mean, weights)
