"""DPSH: deep pairwise-supervised hashing (Li, Wang & Kang, IJCAI 2016).

The net outputs real codes u (a linear hash layer on the shared small CNN). For every pair in a
mini-batch x the whole training set, with s_ij = 1 when the labels match and theta_ij = u_i . u_j / 2,
the loss is the negative log-likelihood of the pairwise labels,
``log(1 + exp(theta)) - s * theta``, plus the quantisation term ``alpha * ||u - sign(u)||^2``.
The other side of each pair comes from a memory of every training row's latest u (updated from
the batch, without gradient), as DeepHash-pytorch does; both terms are means over their entries,
``alpha = 0.1`` as there. Code = u > 0 (sign). The paper's CNN-F on 224x224 RGB is replaced by
the shared small CNN trained from scratch.
"""

from __future__ import annotations

import numpy as np
import torch

from nodule_pipeline.hashing.baselines.deep import DeepHashModel, DeepHashNet, fit_deep_hash
from nodule_pipeline.hashing.baselines.features import check_bits, check_training_inputs
from nodule_pipeline.hashing.objective import pairwise_likelihood_loss


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    bits: int,
    seed: int = 0,
    epochs: int = 25,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    alpha: float = 0.1,
    device: str = "cpu",
) -> DeepHashModel:
    """Train the pairwise likelihood + quantisation loss (Adam; 25 epochs, batch 32 like ours)."""
    labels = check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    y_all = torch.from_numpy(labels)
    memory = torch.zeros(len(labels), bits)

    def batch_loss(module: DeepHashNet, xb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        nonlocal memory, y_all
        memory, y_all = memory.to(xb.device), y_all.to(xb.device)
        u, _ = module(xb)
        memory[index] = u.detach()
        same = (y_all[index, None] == y_all[None, :]).to(u.dtype)
        quantisation = (u - u.detach().sign()).pow(2).mean()
        return pairwise_likelihood_loss(0.5 * u @ memory.T, same) + alpha * quantisation

    return fit_deep_hash(
        "dpsh",
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
