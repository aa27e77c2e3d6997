"""SH: spectral hashing (Weiss, Torralba & Fergus 2008), unsupervised, after the authors' trainSH/compressSH.

PCA to min(bits, 1024) directions; the data are assumed uniform on the box spanned along each
direction; the analytical eigenfunctions of the Laplacian there are
phi_k(x) = sin(pi/2 + k pi (x - min) / (max - min)) with eigenvalue ~ (k / (max - min))^2. The
``bits`` one-dimensional modes with the smallest eigenvalues (k >= 1, over all directions) are
kept; bit j = phi_j(x) > 0. Wide directions thus get several bits of rising frequency, narrow
ones none. Ties between equal eigenvalues go to the earlier direction (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nodule_pipeline.hashing.baselines.features import FeatureMap, check_bits, check_training_inputs, fit_feature_map


@dataclass(frozen=True)
class SpectralHash:
    """PCA map, the box's lower corner along each direction and each bit's (direction, frequency)."""

    features: FeatureMap
    lower: np.ndarray  # (npca,) box minimum along each principal direction
    directions: np.ndarray  # (bits,) int: the principal direction of each bit
    omegas: np.ndarray  # (bits,) angular frequency k * pi / range of each bit

    @property
    def bits(self) -> int:
        return int(self.directions.shape[0])

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> codes (m, bits) bool."""
        shifted = self.features.transform(images)[:, self.directions] - self.lower[self.directions]
        return np.sin(np.pi / 2 + shifted * self.omegas) > 0


def fit(train_images: np.ndarray, train_labels: np.ndarray, bits: int, seed: int = 0) -> SpectralHash:
    """Fit PCA, the box and the mode table; deterministic (``seed`` and labels are unused)."""
    check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    npca = min(bits, 32 * 32)
    feature_map, v = fit_feature_map(train_images, n_components=npca)
    eps = np.finfo(np.float64).eps
    lower, upper = v.min(axis=0) - eps, v.max(axis=0) + eps
    span = upper - lower
    # Enough modes per direction that the `bits` smallest eigenvalues are all in the table.
    max_mode = np.ceil((bits + 1) * span / span.max()).astype(int)
    directions = np.concatenate([np.full(m, i) for i, m in enumerate(max_mode)])
    modes = np.concatenate([np.arange(1, m + 1) for m in max_mode]).astype(np.float64)
    omegas = modes * np.pi / span[directions]
    order = np.argsort(omegas**2, kind="stable")[:bits]
    return SpectralHash(feature_map, lower, directions[order], omegas[order])
