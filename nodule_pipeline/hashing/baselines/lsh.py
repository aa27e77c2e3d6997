"""LSH: random-hyperplane locality-sensitive hashing (Charikar 2002), the data-independent baseline.

Bit j = sign(w_j . (x - mean)) with w_j ~ N(0, I) over the 1024 normalised pixels. Only the mean
is learnt from the data; the Hamming distance then estimates the angle between centred ROIs.
Labels are accepted (common interface) and ignored.
"""

from __future__ import annotations

import numpy as np

from nodule_pipeline.hashing.baselines.features import (
    ProjectionHash,
    check_bits,
    check_training_inputs,
    fit_feature_map,
)


def fit(train_images: np.ndarray, train_labels: np.ndarray, bits: int, seed: int = 0) -> ProjectionHash:
    """Centre the normalised pixels on the training mean and draw ``bits`` Gaussian hyperplanes (seeded)."""
    check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    feature_map, _ = fit_feature_map(train_images)
    projection = np.random.default_rng(seed).standard_normal((feature_map.dim, bits))
    return ProjectionHash(feature_map, projection, "lsh")
