"""Shared tools of the deep hashing baselines: a small CNN for 32x32x1 ROIs, seeded mini-batch training, encoding.

The deep baselines' papers (CNNH, DLBHC, DNNH, DPSH) used ImageNet-scale nets on large RGB images;
32x32 one-channel ROIs and a CPU budget call for a small net trained from scratch, the same one for
every deep baseline so they differ only in their heads and losses. Reproducibility as in
:mod:`nodule_pipeline.hashing.training`: the torch RNG is seeded inside a forked RNG state and
shuffles come from a seeded numpy Generator, so on the CPU the same inputs and seed give the same
codes (CUDA kernels are not bit-exact).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn

from nodule_pipeline.hashing.network import NormalisationStats, normalise_rois
from nodule_pipeline.hashing.training import resolve_device


class SmallCNN(nn.Module):
    """Three conv blocks (5x5/3x3/3x3, BatchNorm, ReLU, 2x2 max-pool: 32 -> 16 -> 8 -> 4) and an FC layer.

    The flattened 4x4 map keeps where things are (unlike global pooling), as AlexNet's fc6 does;
    ``features`` (B, fc_dim) is the analogue of AlexNet's fc7, the layer every deep baseline hashes from.
    About 3 M multiply-adds per ROI, so a few hundred ROIs train for an epoch in well under a second on a CPU core.
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), fc_dim: int = 256, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for index, width in enumerate(channels):
            kernel = 5 if index == 0 else 3
            layers += [
                nn.Conv2d(previous, width, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(previous * 4 * 4, fc_dim), nn.ReLU(inplace=True), nn.Dropout(dropout)
        )
        self.fc_dim = fc_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


class DeepHashNet(nn.Module):
    """Backbone -> hash layer (``bits``) -> optional activation; optional classifier on the hash layer.

    The hash layer is linear unless a method brings its own (it must map ``fc_dim`` features to
    ``bits`` scores and say ``out_features``, as DNNH's divide-and-encode does).
    ``forward`` returns (code scores, logits or None); the code is ``scores > threshold`` of the owner.
    """

    def __init__(
        self,
        bits: int,
        activation: nn.Module | None = None,
        num_classes: int | None = None,
        hash_layer: Callable[[int, int], nn.Module] | None = None,
    ):
        super().__init__()
        self.backbone = SmallCNN()
        self.hash_layer = (hash_layer or nn.Linear)(self.backbone.fc_dim, bits)
        self.activation = activation or nn.Identity()
        self.classifier = nn.Linear(bits, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = self.activation(self.hash_layer(self.backbone(x)))
        return scores, (self.classifier(scores) if self.classifier is not None else None)


@dataclass
class DeepHashModel:
    """A trained deep baseline: the net (eval mode, CPU), the frozen intensity map and the code threshold."""

    module: DeepHashNet
    normalisation: NormalisationStats
    threshold: float
    method: str
    classes: np.ndarray | None = None  # label values of the classifier's outputs, when it has one
    seconds: float = 0.0

    @property
    def bits(self) -> int:
        return int(self.module.hash_layer.out_features)

    def _outputs(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
        if np.size(images) == 0:
            return np.zeros((0, self.bits), np.float32), None
        x, _ = normalise_rois(images, self.normalisation)
        scores, logits = [], []
        self.module.eval()
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                s, lg = self.module(torch.from_numpy(x[start : start + batch_size]))
                scores.append(s.numpy())
                if lg is not None:
                    logits.append(lg.numpy())
        return np.concatenate(scores), (np.concatenate(logits) if logits else None)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> codes (m, bits) bool."""
        return self._outputs(images)[0] > self.threshold

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class labels (m,) int64 from the classifier head (only for methods that train one)."""
        if self.classes is None:
            raise AttributeError(f"{self.method} has no classifier head")
        if np.size(images) == 0:
            return np.zeros(0, dtype=np.int64)
        logits = self._outputs(images)[1]
        return self.classes[logits.argmax(axis=1)].astype(np.int64)


def batch_bounds(n: int, batch_size: int) -> list[int]:
    """Batch boundaries over n rows; a trailing batch of one is folded into the previous (BatchNorm needs 2)."""
    bounds = [*range(0, n, batch_size), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


def check_training_options(epochs: int, batch_size: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (BatchNorm), got {batch_size}")


def fit_deep_hash(
    method: str,
    train_images: np.ndarray,
    make_module: Callable[[], DeepHashNet],
    batch_loss: Callable[[DeepHashNet, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    threshold: float,
    classes: np.ndarray | None = None,
    **training: Any,
) -> DeepHashModel:
    """:func:`train_deep_hash` (``training``: its keyword options), wrapped as the method's trained model."""
    module, stats, seconds = train_deep_hash(train_images, make_module, batch_loss, **training)
    return DeepHashModel(module, stats, threshold=threshold, method=method, classes=classes, seconds=seconds)


def train_deep_hash(
    train_images: np.ndarray,
    make_module: Callable[[], DeepHashNet],
    batch_loss: Callable[[DeepHashNet, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    device: str = "cpu",
) -> tuple[DeepHashNet, NormalisationStats, float]:
    """Fit the intensity map, build the net and train it with Adam; returns (net on CPU, map, seconds).

    ``batch_loss(module, x_batch, row_indices)`` gives the method's loss for one mini-batch; the row
    indices let a method look up its labels or a memory of the other rows' codes.
    """
    check_training_options(epochs, batch_size)
    x_np, stats = normalise_rois(train_images)
    rng = np.random.default_rng(seed)
    target = resolve_device(device)
    devices = [target.index or 0] if target.type == "cuda" else []
    started = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        module = make_module().to(target)
        optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate, weight_decay=weight_decay)
        x = torch.from_numpy(x_np).to(target)
        bounds = batch_bounds(len(x), batch_size)
        module.train()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(x))).to(target)
            for start, stop in pairwise(bounds):
                index = order[start:stop]
                loss = batch_loss(module, x[index], index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    module.to("cpu").eval()
    return module, stats, time.perf_counter() - started
