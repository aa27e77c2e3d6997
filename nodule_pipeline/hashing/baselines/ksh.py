"""KSH: kernel-based supervised hashing (Liu, Wang, Ji, Jiang & Chang, CVPR 2012), the supervised shallow baseline.

Bit j = sgn(a_j . k̄(x)), where k̄(x) are RBF kernel values to ``n_anchors`` random training
anchors (centred by their training mean; kernel width = the mean squared distance to the anchors,
as the authors' code does). The a_j are learnt greedily, one bit at a time, so that code inner
products fit the label similarity: on ``n_labelled`` training points, S_ij = +1 for the same
label, -1 otherwise, and bit j minimises -b_j^T R_{j-1} b_j with the residue
R_{j-1} = bits * S - sum_{t<j} b_t b_t^T. Each bit starts from the spectral relaxation (largest
generalised eigenvector), is refined by L-BFGS on the smooth surrogate sgn(z) ~ 2/(1 + e^-z) - 1,
and the better of the two (by the discrete objective) is kept, as in the paper.

S is never formed: with one-hot labels Y, S = 2 Y Y^T - 1 1^T, so every product with the residue is
low-rank and the cost grows with n_labelled * n_anchors, not n_labelled^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg, optimize

from nodule_pipeline.hashing.baselines.features import FeatureMap, check_bits, check_training_inputs, fit_feature_map


def _sq_distances(x: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    d = (x * x).sum(axis=1)[:, None] + (anchors * anchors).sum(axis=1)[None, :] - 2.0 * x @ anchors.T
    return np.maximum(d, 0.0)


@dataclass(frozen=True)
class KernelHash:
    """Feature map, anchors, RBF width, the kernel's training mean and the projections (n_anchors, bits)."""

    features: FeatureMap
    anchors: np.ndarray  # (m, dim)
    sigma: float  # kernel exp(-d^2 / (2 sigma)), sigma = mean squared distance to the anchors
    kernel_mean: np.ndarray  # (m,)
    projections: np.ndarray  # (m, bits)

    @property
    def bits(self) -> int:
        return int(self.projections.shape[1])

    def kernel(self, features: np.ndarray) -> np.ndarray:
        """Centred kernel features (n, m) of already mapped features."""
        return np.exp(-_sq_distances(features, self.anchors) / (2.0 * self.sigma)) - self.kernel_mean

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> codes (m, bits) bool."""
        return self.kernel(self.features.transform(images)) @ self.projections > 0


def fit_anchor_kernel(
    x: np.ndarray, n_anchors: int, rng: np.random.Generator
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Draw ``n_anchors`` training rows as anchors; returns (anchors, sigma, kernel mean, centred kernel (n, m)).

    Shared with BRE, which hashes through the same centred RBF kernel features.
    """
    n = len(x)
    anchors = x[np.sort(rng.choice(n, size=min(n_anchors, n), replace=False))]
    sq = _sq_distances(x, anchors)
    sigma = float(sq.mean()) or 1.0
    kernel = np.exp(-sq / (2.0 * sigma))
    kernel_mean = kernel.mean(axis=0)
    return anchors, sigma, kernel_mean, kernel - kernel_mean


class _Residue:
    """R = scale * (2 Y Y^T - 1 1^T) - B B^T as an operator (never materialised)."""

    def __init__(self, onehot: np.ndarray, scale: float, capacity: int):
        self.y = onehot
        self.scale = scale
        self.codes = np.zeros((len(onehot), capacity))
        self.count = 0

    def apply(self, v: np.ndarray) -> np.ndarray:
        b = self.codes[:, : self.count]
        return self.scale * (2.0 * self.y @ (self.y.T @ v) - v.sum()) - b @ (b.T @ v)

    def cost(self, code: np.ndarray) -> float:
        """The greedy step's discrete objective -b^T R b (lower is better)."""
        return -float(code @ self.apply(code))

    def add(self, code: np.ndarray) -> None:
        self.codes[:, self.count] = code
        self.count += 1


def _surrogate(a: np.ndarray, k: np.ndarray, residue: _Residue) -> tuple[float, np.ndarray]:
    """-phi^T R phi and its gradient in a, phi = 2 / (1 + exp(-K a)) - 1 = tanh(K a / 2)."""
    phi = np.tanh(0.5 * (k @ a))
    r_phi = residue.apply(phi)
    grad = -k.T @ (r_phi * (1.0 - phi * phi))  # d/da of -phi^T R phi: -2 K^T (R phi * phi'), phi' = (1 - phi^2)/2
    return -float(phi @ r_phi), grad


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    bits: int,
    seed: int = 0,
    n_anchors: int = 300,
    n_labelled: int = 1000,
    max_iter: int = 100,
) -> KernelHash:
    """Anchors and the labelled subsample are drawn with ``seed``; defaults follow the paper (300 anchors, l = 1000)."""
    labels = check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    rng = np.random.default_rng(seed)
    feature_map, x = fit_feature_map(train_images)
    n = len(x)
    anchors, sigma, kernel_mean, kernel = fit_anchor_kernel(x, n_anchors, rng)
    labelled = np.sort(rng.choice(n, size=min(n_labelled, n), replace=False))
    k = kernel[labelled]  # (n_lab, m)
    n_lab, m = k.shape
    classes, inverse = np.unique(labels[labelled], return_inverse=True)
    onehot = np.eye(len(classes))[inverse]

    residue = _Residue(onehot, float(bits), bits)
    # Spectral step: max a^T K^T R K a s.t. a^T K^T K a = l. Whitening by the Cholesky factor of K^T K
    # turns it into an ordinary symmetric eigenproblem whose matrix is updated by one rank-1 term per bit.
    gram = k.T @ k + 1e-6 * max(float(np.trace(k.T @ k)) / m, 1e-12) * np.eye(m)
    chol = linalg.cholesky(gram, lower=True)
    kp, ks = k.T @ onehot, k.sum(axis=0)
    whitened = linalg.solve_triangular(chol, np.column_stack([kp, ks]), lower=True)
    wp, ws = whitened[:, :-1], whitened[:, -1]
    spectral = float(bits) * (2.0 * wp @ wp.T - np.outer(ws, ws))

    projections = np.zeros((m, bits))
    for j in range(bits):
        _, top = linalg.eigh(spectral, subset_by_index=[m - 1, m - 1])
        a0 = linalg.solve_triangular(chol.T, top[:, 0], lower=False) * np.sqrt(n_lab)
        code0 = np.where(k @ a0 > 0, 1.0, -1.0)
        result = optimize.minimize(
            _surrogate, a0, args=(k, residue), jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
        )
        code1 = np.where(k @ result.x > 0, 1.0, -1.0)
        a, code = (result.x, code1) if residue.cost(code1) <= residue.cost(code0) else (a0, code0)
        projections[:, j] = a
        residue.add(code)
        q = linalg.solve_triangular(chol, k.T @ code, lower=True)
        spectral -= np.outer(q, q)
    return KernelHash(feature_map, anchors, sigma, kernel_mean, projections)
