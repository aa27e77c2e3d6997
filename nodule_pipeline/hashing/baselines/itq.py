"""ITQ: PCA + iterative quantisation (Gong & Lazebnik 2011), unsupervised.

PCA to ``bits`` dimensions (so bits <= 1024), then a rotation R that minimises the quantisation
loss ||B - V R||_F^2 by alternating B = sign(V R) and the orthogonal Procrustes step
R = U_A U_B^T from the SVD of B^T V (the paper's 50 iterations, R started at a random rotation).
Codes = V R > 0.
"""

from __future__ import annotations

import numpy as np

from nodule_pipeline.hashing.baselines.features import (
    ProjectionHash,
    check_bits,
    check_training_inputs,
    fit_feature_map,
)


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal (dim, dim) matrix (QR of a Gaussian, signs fixed so it is Haar-distributed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def itq_rotation(v: np.ndarray, rotation: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Refine ``rotation`` for centred data ``v`` (n, k) by ITQ's alternating minimisation.

    ``rotation`` is (k, bits) with orthonormal rows, square for ITQ; CNNH rounds its k-dimensional
    relaxed codes to bits >= k with the same steps (thin SVD: the Procrustes step of a wide R).
    """
    for _ in range(iterations):
        b = np.where(v @ rotation >= 0, 1.0, -1.0)
        u_b, _, u_a_t = np.linalg.svd(b.T @ v, full_matrices=False)  # B^T V = U_B S U_A^T
        rotation = u_a_t.T @ u_b.T
    return rotation


def fit(
    train_images: np.ndarray, train_labels: np.ndarray, bits: int, seed: int = 0, iterations: int = 50
) -> ProjectionHash:
    """PCA to ``bits`` components, then ``iterations`` ITQ steps from a seeded random rotation."""
    check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    feature_map, v = fit_feature_map(train_images, n_components=bits)
    rotation = itq_rotation(v, random_rotation(bits, np.random.default_rng(seed)), iterations)
    return ProjectionHash(feature_map, rotation, "itq")
