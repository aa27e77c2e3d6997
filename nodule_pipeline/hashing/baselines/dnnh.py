"""DNNH: simultaneous feature learning and hash coding (Lai, Pan, Liu & Yan, CVPR 2015), supervised by triplets.

The shared small CNN (:mod:`.deep`) feeds the paper's divide-and-encode module: its ``fc_dim``
features are cut into ``slices`` equal slices and each slice alone is mapped to bits / slices
sigmoid units (the paper: one bit per slice, so bits are computed from disjoint features and
less redundant). ``slices`` defaults to gcd(bits, fc_dim / 8): slices at least 8 features wide,
so one bit per slice up to 32 bits and several beyond: a bit read off one ReLU unit is constant
wherever that unit is 0 (on the tests' ROIs at 256 bits, one unit a bit gave a mean bit entropy of
0.17, eight units a slice 0.48).
The sigmoid outputs pass the paper's piece-wise threshold (0 below 0.5 - eps, 1 above
0.5 + eps, unchanged between) and are trained end-to-end with the triplet ranking hinge
max(0, ||F(q) - F(q+)||^2 - ||F(q) - F(q-)||^2 + 1), q+ with q's label, q- without. Code = output > 0.5.
Simplified: the triplets are every valid (q, q+, q-) inside a mini-batch rather than a triplet list
drawn beforehand; the small CNN replaces the paper's net (32x32x1 ROIs, CPU budget).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from nodule_pipeline.hashing.baselines.deep import DeepHashModel, DeepHashNet, fit_deep_hash
from nodule_pipeline.hashing.baselines.features import check_bits, check_training_inputs, check_two_classes

MIN_SLICE_WIDTH = 8
"""Features per slice at the least when ``slices`` is left to the default."""


class DivideAndEncode(nn.Module):
    """(B, in_features) -> (B, bits): slice s of the input only reaches bits s*k .. s*k + k - 1 (k = bits / slices)."""

    def __init__(self, in_features: int, bits: int, slices: int):
        super().__init__()
        if in_features % slices or bits % slices:
            raise ValueError(f"slices ({slices}) must divide both the features ({in_features}) and bits ({bits})")
        self.slices, self.width, self.out_features = slices, in_features // slices, bits
        # Small weights (Caffe's Gaussian(0.01) as in the paper's nets): every output starts inside the
        # piece-wise threshold's linear band, where it gets a gradient, instead of frozen at 0 or 1.
        self.weight = nn.Parameter(0.01 * torch.randn(slices, self.width, bits // slices))
        self.bias = nn.Parameter(torch.zeros(slices, bits // slices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sliced = x.reshape(len(x), self.slices, self.width)
        return (torch.einsum("bsw,swk->bsk", sliced, self.weight) + self.bias).reshape(len(x), self.out_features)


class PiecewiseThreshold(nn.Module):
    """The paper's quantiser on sigmoid outputs: 0 below 0.5 - eps, 1 above 0.5 + eps, identity between."""

    def __init__(self, eps: float = 0.1):
        super().__init__()
        self.eps = eps

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.where(s < 0.5 - self.eps, 0.0, torch.where(s > 0.5 + self.eps, 1.0, s))


def triplet_ranking_loss(codes: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean hinge over every (q, q+, q-) of the batch with labels[q] == labels[q+] != labels[q-], q != q+."""
    distances = (codes[:, None, :] - codes[None, :, :]).pow(2).sum(dim=-1)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=codes.device)
    valid = positive[:, :, None] & ~same[:, None, :]
    if not bool(valid.any()):
        return codes.sum() * 0.0  # one class in the batch: no triplet, nothing to learn here
    hinge = torch.relu(distances[:, :, None] - distances[:, None, :] + margin)
    return hinge[valid].mean()


def fit(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    bits: int,
    seed: int = 0,
    epochs: int = 25,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    slices: int | None = None,
    eps: float = 0.1,
    device: str = "cpu",
) -> DeepHashModel:
    """CNN -> divide-and-encode -> sigmoid -> piece-wise threshold, on in-batch triplets (Adam; 25 epochs, batch 32)."""
    labels = check_training_inputs(train_images, train_labels)
    bits = check_bits(bits)
    check_two_classes(labels, "DNNH")
    y_all = torch.from_numpy(labels)

    def batch_loss(module: DeepHashNet, xb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        codes, _ = module(xb)
        return triplet_ranking_loss(codes, y_all.to(xb.device)[index])

    def make_module() -> DeepHashNet:
        def layer(in_features: int, out_bits: int) -> DivideAndEncode:
            return DivideAndEncode(in_features, out_bits, slices or math.gcd(out_bits, in_features // MIN_SLICE_WIDTH))

        return DeepHashNet(bits, activation=nn.Sequential(nn.Sigmoid(), PiecewiseThreshold(eps)), hash_layer=layer)

    return fit_deep_hash(
        "dnnh",
        train_images,
        make_module,
        batch_loss,
        threshold=0.5,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate,
        device=device,
    )
