"""DLBHC: deep learning of binary hash codes (Lin, Yang, Hsiao & Chen, CVPRW 2015), supervised by classification.

A latent layer H of ``bits`` sigmoid units sits between the CNN's fc7-like layer and the softmax
classifier; the net is trained with cross-entropy only, so H learns class-discriminative,
near-binary activations; code = H > 0.5. The paper fine-tuned an ImageNet AlexNet; here the
shared :class:`~nodule_pipeline.hashing.baselines.deep.SmallCNN` is trained from scratch (the ROIs
are 32x32x1). This is not the project's ``HashNet(variant="cnn")``: that one mean-pools a 5-conv
map and is the paper's "CNN" row of Table 2; DLBHC keeps the spatial map (flatten, as AlexNet's
fc6) and is the paper's separate retrieval baseline. The paper's coarse-to-fine stage (re-ranking
on fc7) is not part of this baseline: it is compared on Hamming ranking like the others.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nodule_pipeline.hashing.baselines.deep import DeepHashModel, DeepHashNet, fit_deep_hash
from nodule_pipeline.hashing.baselines.features import check_bits, check_training_inputs, check_two_classes


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
    """Train CNN -> sigmoid latent (bits) -> softmax with cross-entropy (Adam; the paper's 25 epochs, batch 32)."""
    labels = check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    classes = check_two_classes(labels, "DLBHC")
    y_all = torch.from_numpy(np.searchsorted(classes, labels).astype(np.int64))

    def batch_loss(module: DeepHashNet, xb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        _, logits = module(xb)
        return F.cross_entropy(logits, y_all.to(xb.device)[index])

    return fit_deep_hash(
        "dlbhc",
        train_images,
        lambda: DeepHashNet(bits, activation=nn.Sigmoid(), num_classes=len(classes)),
        batch_loss,
        threshold=0.5,
        classes=classes,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate,
        device=device,
    )
