"""ELM: extreme learning machine classifier (Huang, Zhu & Siew 2006; ridge form of Huang et al. 2012).

One hidden layer of ``hidden`` sigmoid units whose input weights and biases are random and never
trained (seeded); only the output weights are fitted, in closed form, by ridge-regularised least
squares on one-hot targets: beta = (H^T H + I / C)^-1 H^T T (or the dual form when n < hidden).
Inputs are the centred normalised pixels; the random weights are scaled so pre-activations have
about unit variance (unscaled uniform weights over 1024 pixels would saturate every sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from nodule_pipeline.hashing.baselines.features import FeatureMap, check_training_inputs, fit_feature_map


@dataclass(frozen=True)
class ELMClassifier:
    """Feature map, the random hidden layer and the least-squares output weights."""

    features: FeatureMap
    weights: np.ndarray  # (dim, hidden), random
    biases: np.ndarray  # (hidden,), random
    output: np.ndarray  # (hidden, classes), fitted
    classes: np.ndarray

    def hidden_layer(self, features: np.ndarray) -> np.ndarray:
        # The logistic sigmoid, written with tanh so large pre-activations cannot overflow exp.
        return 0.5 * (1.0 + np.tanh(0.5 * (features @ self.weights + self.biases)))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> class labels (m,) int64."""
        if np.size(images) == 0:
            return np.zeros(0, dtype=np.int64)
        scores = self.hidden_layer(self.features.transform(images)) @ self.output
        return self.classes[scores.argmax(axis=1)].astype(np.int64)


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    seed: int = 0,
    hidden: int = 1000,
    c: float = 1.0,
    n_components: int | None = None,
) -> ELMClassifier:
    """Draw the hidden layer with ``seed`` and solve the output weights (ridge 1 / ``c``)."""
    labels = check_training_inputs(train_images, train_labels)
    if hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden}")
    if not c > 0:
        raise ValueError(f"c must be positive, got {c}")
    classes, inverse = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("an ELM classifier needs at least two classes in the training labels")
    feature_map, x = fit_feature_map(train_images, n_components=n_components)
    rng = np.random.default_rng(seed)
    norm = np.sqrt(max(float((x * x).sum(axis=1).mean()), 1e-12))
    weights = rng.standard_normal((x.shape[1], hidden)) / norm
    biases = rng.uniform(-1.0, 1.0, hidden)
    partial = ELMClassifier(feature_map, weights, biases, np.zeros((hidden, len(classes))), classes)
    h = partial.hidden_layer(x)
    targets = np.eye(len(classes))[inverse]
    ridge = 1.0 / c
    if hidden <= len(h):
        output = linalg.solve(h.T @ h + ridge * np.eye(hidden), h.T @ targets, assume_a="pos")
    else:
        output = h.T @ linalg.solve(h @ h.T + ridge * np.eye(len(h)), targets, assume_a="pos")
    return ELMClassifier(feature_map, weights, biases, output, classes)
