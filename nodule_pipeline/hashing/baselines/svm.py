"""SVM classifier baseline (the paper's Table 2 "SVM" row) on the normalised, flattened ROI pixels.

An L2-loss (squared-hinge) SVM, ``min 1/2 ||w||^2 + C sum max(0, 1 - y f(x))^2``, RBF kernel by
default, trained exactly in the primal by Chapelle's (2007) Newton method: with the current support
vectors SV (margin violators) the optimum solves one linear system
``[[0, 1^T], [1, K_SV + I / 2C]] [b; beta_SV] = [0; y_SV]``; iterate until SV stops changing.
No scikit-learn needed, deterministic, and exact for the few thousand training ROIs here (one
O(|SV|^3) solve per step; memory O(n^2)). Multi-class: one-vs-rest. The squared hinge differs from
LIBSVM's default hinge loss only in how hard violations are penalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from nodule_pipeline.hashing.baselines.features import FeatureMap, check_training_inputs, fit_feature_map


def _kernel(a: np.ndarray, b: np.ndarray, kernel: str, gamma: float) -> np.ndarray:
    inner = a @ b.T
    if kernel == "linear":
        return inner
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * inner
    return np.exp(-gamma * np.maximum(sq, 0.0))


def _objective(k: np.ndarray, y: np.ndarray, beta: np.ndarray, b: float, c: float) -> tuple[float, np.ndarray]:
    kb = k @ beta
    slack = np.maximum(0.0, 1.0 - y * (kb + b))
    return 0.5 * float(beta @ kb) + c * float(slack @ slack), kb + b


def train_binary(k: np.ndarray, y: np.ndarray, c: float, max_iter: int = 50) -> tuple[np.ndarray, float]:
    """Primal Newton for one +-1 problem on the kernel matrix k (n, n); returns (beta (n,), bias)."""
    n = len(y)
    beta, bias = np.zeros(n), 0.0
    best, f = _objective(k, y, beta, bias, c)
    active = np.ones(n, dtype=bool)  # first step: every point (the least-squares SVM)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        system = np.zeros((idx.size + 1, idx.size + 1))
        system[0, 1:] = system[1:, 0] = 1.0
        system[1:, 1:] = k[np.ix_(idx, idx)] + np.eye(idx.size) / (2.0 * c)
        solution = linalg.solve(system, np.concatenate([[0.0], y[idx]]), assume_a="sym")
        step_beta = np.zeros(n)
        step_beta[idx] = solution[1:]
        step_bias = float(solution[0])
        # The Newton point of a piecewise quadratic can overshoot: backtrack until the objective falls.
        t = 1.0
        while t > 1e-6:
            cand_beta, cand_bias = beta + t * (step_beta - beta), bias + t * (step_bias - bias)
            value, cand_f = _objective(k, y, cand_beta, cand_bias, c)
            if value <= best:
                break
            t *= 0.5
        else:
            break
        improved = best - value
        beta, bias, best, f = cand_beta, cand_bias, value, cand_f
        new_active = y * f < 1.0
        if np.array_equal(new_active, active) or improved <= 1e-12 * max(abs(best), 1.0):
            break
        active = new_active
    return beta, bias


@dataclass(frozen=True)
class SVMClassifier:
    """Feature map, support vectors, one column of coefficients and one bias per one-vs-rest machine."""

    features: FeatureMap
    kernel: str
    gamma: float
    support: np.ndarray  # (s, dim)
    coef: np.ndarray  # (s, machines)
    intercept: np.ndarray  # (machines,)
    classes: np.ndarray

    def decision_function(self, images: np.ndarray) -> np.ndarray:
        """(m, machines) margins; for two classes one column, positive = ``classes[1]``."""
        x = self.features.transform(images)
        return _kernel(x, self.support, self.kernel, self.gamma) @ self.coef + self.intercept

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> class labels (m,) int64."""
        if np.size(images) == 0:
            return np.zeros(0, dtype=np.int64)
        scores = self.decision_function(images)
        chosen = (scores[:, 0] > 0).astype(int) if len(self.classes) == 2 else scores.argmax(axis=1)
        return self.classes[chosen].astype(np.int64)


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    seed: int = 0,
    kernel: str = "rbf",
    c: float = 1.0,
    gamma: float | str = "scale",
    n_components: int | None = None,
) -> SVMClassifier:
    """Fit on raw training ROIs. ``gamma="scale"`` is 1 / (dim * feature variance) (scikit-learn's default);
    ``n_components`` optionally reduces the pixels by PCA first. Deterministic (``seed`` is unused)."""
    labels = check_training_inputs(train_images, train_labels)
    if kernel not in ("rbf", "linear"):
        raise ValueError(f"kernel must be 'rbf' or 'linear', got {kernel!r}")
    if not c > 0:
        raise ValueError(f"c must be positive, got {c}")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("an SVM needs at least two classes in the training labels")
    feature_map, x = fit_feature_map(train_images, n_components=n_components)
    if gamma == "scale":
        gamma = 1.0 / (x.shape[1] * max(float(x.var()), 1e-12))
    elif isinstance(gamma, str) or not gamma > 0:
        raise ValueError(f"gamma must be 'scale' or a positive number, got {gamma!r}")
    k = _kernel(x, x, kernel, float(gamma))
    targets = [classes[1]] if len(classes) == 2 else list(classes)
    betas, biases = [], []
    for positive in targets:
        beta, bias = train_binary(k, np.where(labels == positive, 1.0, -1.0), c)
        betas.append(beta)
        biases.append(bias)
    coef = np.column_stack(betas)
    support = np.flatnonzero(np.any(coef != 0, axis=1))
    return SVMClassifier(feature_map, kernel, float(gamma), x[support], coef[support], np.array(biases), classes)
