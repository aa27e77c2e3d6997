"""CNNH: convolutional neural network hashing (Xia, Pan, Lai, Liu & Yan, AAAI 2014), supervised, two stages.

Stage 1 finds approximate codes H in {-1, 1}^(n x bits) with H H^T ~ bits * S, S_ij = 1 for the
same label and -1 otherwise. S = 2 Y Y^T - 1 1^T (Y one-hot) has rank <= classes, so its positive
part is found exactly from a classes x classes eigenproblem: the relaxed codes bits^(1/2) U_+ L_+^(1/2)
(n x k, k = number of positive eigenvalues) reproduce bits * S_+, and any (k, bits) R with
orthonormal rows keeps that; R is chosen to make sign(V R) lose least, by ITQ's alternation
(:func:`~nodule_pipeline.hashing.baselines.itq.itq_rotation`) from a seeded random start.
The paper instead runs coordinate descent on H in [-1, 1]; both minimise the same relaxed
objective, whose minimiser with label similarity gives every row of a class the same code (two
classes: one code and its complement), so CNNH's codes are class codes by construction.

Stage 2 trains the shared small CNN (:mod:`.deep`) with ``bits`` outputs to predict H, a logistic
loss per bit on targets (H + 1) / 2; code = output > 0 (the sign). The features are not trained
with the codes (the paper's point against it: no end-to-end feedback). Simplified: no CNNH+
label head; the small CNN replaces the paper's net (32x32x1 ROIs, CPU budget).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from nodule_pipeline.hashing.baselines.deep import DeepHashModel, DeepHashNet, fit_deep_hash
from nodule_pipeline.hashing.baselines.features import check_bits, check_training_inputs, check_two_classes
from nodule_pipeline.hashing.baselines.itq import itq_rotation, random_rotation


def approximate_codes(labels: np.ndarray, bits: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Stage 1: +-1 codes (n, bits) whose inner products approximate bits * S for label similarity S."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    root = np.sqrt(counts.astype(np.float64))
    small = root[:, None] * (2.0 * np.eye(len(counts)) - 1.0) * root[None, :]  # S = Q small Q^T, Q = Y / root
    values, vectors = np.linalg.eigh(small)
    order = np.argsort(-values, kind="stable")
    top = order[values[order] > 1e-9 * max(float(values.max()), 1.0)][:bits]  # the positive part, largest first
    values, vectors = values[top], vectors[:, top]
    vectors = vectors * np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    relaxed = np.sqrt(bits) * (vectors * np.sqrt(values))[inverse] / root[inverse, None]  # (n, k)
    start = random_rotation(bits, np.random.default_rng(seed))[: relaxed.shape[1]]
    rotation = itq_rotation(relaxed, start, iterations)
    return np.where(relaxed @ rotation >= 0.0, 1.0, -1.0)


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    bits: int,
    seed: int = 0,
    epochs: int = 25,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    device: str = "cpu",
) -> DeepHashModel:
    """Stage 1 codes from the labels, then the CNN fitted to them (Adam; 25 epochs, batch 32 like DLBHC)."""
    labels = check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    check_two_classes(labels, "CNNH")
    targets = torch.from_numpy((approximate_codes(labels, bits, seed) > 0).astype(np.float32))

    def batch_loss(module: DeepHashNet, xb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        scores, _ = module(xb)
        return F.binary_cross_entropy_with_logits(scores, targets.to(xb.device)[index])

    return fit_deep_hash(
        "cnnh",
        train_images,
        lambda: DeepHashNet(bits),
        batch_loss,
        threshold=0.0,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate,
        device=device,
    )
