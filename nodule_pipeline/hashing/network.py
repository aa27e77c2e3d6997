"""The deep hashing network of Hao et al. 2022 (section 1.3, Fig. 2, Tables 1-2) and ROI normalisation.

One network class covers the paper's model and every deep variant of its Table 2: the CNN
branch and the BiLSTM branch are switched on or off, their attention pooling is switched on or
off, and the serial variants feed one branch's output into the other. Keeping them one class
means an ablation differs from the real model only in the switches it names.

Layout (variant ``"ours"``)::

    ROI (1, 32, 32) --+-- CNN (5 conv, AlexNet-style) -- spatial attention --+
                      |                                                      +-- concat -- FC -- fc
                      +-- BiLSTM over the 32 rows ---- temporal attention ---+
    fc -- dropout -- hash layer h = sigmoid(W fc + b) (H nodes) -- code = h > 0.5
     |                               |
     |                               +-- softmax classifier (reads h, as in the paper's Fig. 2)
     +-- rating head (optional): logits over each reader rating's levels (``rating_outputs``)

The classifier reads the hash layer, not ``fc``: class supervision then flows through ``h`` and
shapes the codes, which is what makes Hamming retrieval class-aware.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

ROI_SIZE = 32
ALLOWED_BITS = (32, 64, 128, 256, 512, 1024)
HU_WINDOW = (-1200.0, 600.0)
"""Fixed Hounsfield window (air/lung to dense tissue; calcium above 600 HU saturates)."""
HU_DETECTION_THRESHOLD = -300.0
"""Data whose 1st percentile lies below this are taken as HU: only CT air/lung values go so low."""


@dataclass(frozen=True)
class _Variant:
    cnn: bool
    bilstm: bool
    attention: bool
    serial: str | None  # "bilstm_cnn": BiLSTM feeds the CNN; "cnn_bilstm": CNN feeds the BiLSTM
    table2: str  # the row of the paper's Table 2 this variant reproduces


_VARIANTS: dict[str, _Variant] = {
    "ours": _Variant(True, True, True, None, "Our method"),
    "cnn": _Variant(True, False, False, None, "CNN"),
    "bilstm": _Variant(False, True, False, None, "BiLSTM"),
    "cnn_am": _Variant(True, False, True, None, "CNN+AM"),
    "bilstm_am": _Variant(False, True, True, None, "BiLSTM+AM"),
    "serial_bilstm_cnn": _Variant(True, True, False, "bilstm_cnn", "BiLSTM+CNN"),
    "serial_cnn_bilstm": _Variant(True, True, False, "cnn_bilstm", "CNN+BiLSTM"),
    "parallel": _Variant(True, True, False, None, "BiLSTM_CNN"),
}
VARIANTS: dict[str, str] = {name: spec.table2 for name, spec in _VARIANTS.items()}
"""Variant name -> the paper's Table 2 row label (for reports)."""


@dataclass(frozen=True)
class NetworkConfig:
    """Sizes and switches of :class:`HashNet`: the paper's architecture (Table 1), with widths
    chosen on real LIDC nodules; :meth:`paper` gives the paper's own widths.

    ``lstm_hidden``/``attention_dim``: the paper's 768/768 (1536 BiLSTM neurons) and 128/128
    reach the same test accuracy on the real nodules (0.880 and 0.884, mean of three patient
    splits), but the paper's size trains about 4x slower on a CPU (110 against 530 ROIs/s on two
    cores), so the default is 128. ``fc_dim`` defaults to 1024 so the paper's bound
    ``log2(classes) <= bits <= fc_dim`` (its equation 1) holds for every hash size it tried;
    only the lower bound is enforced, because a smaller ``fc_dim`` is a legitimate speed
    trade-off for experiments. ``cnn_channels`` are the five conv layers' widths; the paper does
    not give them. Half (16..64) and double (64..256) these widths measured the same accuracy.
    ``rating_outputs``: width of the auxiliary head that predicts the readers' ratings from ``fc``
    (:data:`~nodule_pipeline.hashing.characteristics.ENCODED_WIDTH`), 0 for none; training sets
    it when the table has ratings and the recipe weighs them.
    """

    bits: int = 256
    variant: str = "ours"
    lstm_hidden: int = 128
    attention_dim: int = 128
    fc_dim: int = 1024
    num_classes: int = 2
    dropout: float = 0.5
    cnn_channels: tuple[int, ...] = (32, 64, 128, 128, 128)
    rating_outputs: int = 0

    def __post_init__(self) -> None:
        if self.variant not in _VARIANTS:
            raise ValueError(f"unknown network variant {self.variant!r}; valid: {', '.join(_VARIANTS)}")
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {self.bits}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if math.log2(self.num_classes) > self.bits:
            raise ValueError(
                f"{self.bits} bits cannot separate {self.num_classes} classes (need log2(classes) <= bits)"
            )
        if self.rating_outputs < 0:
            raise ValueError(f"rating_outputs must be >= 0, got {self.rating_outputs}")
        for name in ("lstm_hidden", "attention_dim", "fc_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        channels = tuple(int(c) for c in self.cnn_channels)
        if len(channels) != 5 or min(channels) < 1:
            raise ValueError(f"cnn_channels must be five positive widths, got {self.cnn_channels}")
        object.__setattr__(self, "cnn_channels", channels)

    @classmethod
    def paper(cls, **overrides: Any) -> NetworkConfig:
        """The paper's widths: a BiLSTM of 2 x 768 neurons and 768 attention nodes."""
        return cls(**{"lstm_hidden": 768, "attention_dim": 768, **overrides})

    @property
    def spec(self) -> _Variant:
        return _VARIANTS[self.variant]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cnn_channels"] = list(self.cnn_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NetworkConfig field(s) {unknown}")
        values = dict(data)
        if "cnn_channels" in values:
            values["cnn_channels"] = tuple(values["cnn_channels"])
        return cls(**values)


class HashNetOutput(NamedTuple):
    """``fc``: features for Euclidean re-ranking; ``hash_probs``: sigmoid h (code = h > 0.5);
    ``logits``; ``rating_logits``: the rating head's logits per rating level (None without a head)."""

    fc: torch.Tensor
    hash_probs: torch.Tensor
    logits: torch.Tensor
    rating_logits: torch.Tensor | None = None


class ConvBranch(nn.Module):
    """AlexNet-style stack for 32x32 inputs: 5 conv (3x3, BN, ReLU), pooling after the first two.

    The third AlexNet pooling is left out so the map stays 8x8: 64 positions give the spatial
    attention something to choose between (4x4 would be too coarse for small nodules).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if index < 2:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.layers = nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AttentionPool(nn.Module):
    """Additive attention over a sequence: a_t = softmax_t(v . tanh(W x_t + b)); returns sum_t a_t x_t.

    Used over the BiLSTM's time steps (rows) and, on a flattened conv map, over spatial positions.
    """

    def __init__(self, in_dim: int, attention_dim: int):
        super().__init__()
        self.project = nn.Linear(in_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(torch.tanh(self.project(x))), dim=1)  # (B, T, 1)
        return (weights * x).sum(dim=1)


class MeanPool(nn.Module):
    """Uniform weights: the 'without attention' ablation, so it differs from attention only in the weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _pool(enabled: bool, in_dim: int, attention_dim: int) -> nn.Module:
    return AttentionPool(in_dim, attention_dim) if enabled else MeanPool()


def _positions(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): conv map positions as a sequence for pooling."""
    return feature_map.flatten(2).transpose(1, 2)


class HashNet(nn.Module):
    """The paper's deep hashing network (or one of its Table 2 variants, per ``config.variant``).

    Input: (B, 1, 32, 32) normalised ROIs (see :func:`normalise_rois`). The BiLSTM reads the 32
    image rows as a sequence of 32-dim vectors. Without attention a branch is mean-pooled (over
    positions or time steps). Serial ``bilstm_cnn``: the BiLSTM's per-row outputs are projected
    back to 32 values, forming a 32x32 map the CNN reads. Serial ``cnn_bilstm``: the CNN's 8x8
    map is read row by row (8 steps of C*8 values) by the BiLSTM.
    """

    def __init__(self, config: NetworkConfig | None = None):
        super().__init__()
        self.config = config = config or NetworkConfig()
        spec = config.spec
        hidden = config.lstm_hidden
        fused = 0
        self.cnn: ConvBranch | None = None
        self.lstm: nn.LSTM | None = None
        self.bridge: nn.Linear | None = None
        if spec.cnn:
            self.cnn = ConvBranch(1, config.cnn_channels)
        cnn_out = config.cnn_channels[-1]
        if spec.serial == "cnn_bilstm":
            map_width = ROI_SIZE // 4
            self.lstm = nn.LSTM(cnn_out * map_width, hidden, batch_first=True, bidirectional=True)
        elif spec.bilstm:
            self.lstm = nn.LSTM(ROI_SIZE, hidden, batch_first=True, bidirectional=True)
        if spec.serial == "bilstm_cnn":
            self.bridge = nn.Linear(2 * hidden, ROI_SIZE)
            self.pool = _pool(spec.attention, cnn_out, min(config.attention_dim, cnn_out))
            fused = cnn_out
        elif spec.serial == "cnn_bilstm":
            self.pool = _pool(spec.attention, 2 * hidden, config.attention_dim)
            fused = 2 * hidden
        else:
            if spec.cnn:
                # Spatial attention width follows the channel count: a 768-wide projection of
                # 256 channels at 64 positions costs time without adding capacity.
                self.cnn_pool = _pool(spec.attention, cnn_out, min(config.attention_dim, cnn_out))
                fused += cnn_out
            if spec.bilstm:
                self.lstm_pool = _pool(spec.attention, 2 * hidden, config.attention_dim)
                fused += 2 * hidden
        self.fused_dim = fused
        self.fc = nn.Sequential(nn.Linear(fused, config.fc_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(config.dropout)
        self.hash_layer = nn.Linear(config.fc_dim, config.bits)
        self.classifier = nn.Linear(config.bits, config.num_classes)
        self.rating_head = nn.Linear(config.fc_dim, config.rating_outputs) if config.rating_outputs else None

    def fused_features(self, x: torch.Tensor) -> torch.Tensor:
        """The branch outputs, pooled and concatenated (before the FC layer)."""
        if x.ndim != 4 or x.shape[1:] != (1, ROI_SIZE, ROI_SIZE):
            raise ValueError(f"HashNet expects (B, 1, {ROI_SIZE}, {ROI_SIZE}) input, got {tuple(x.shape)}")
        serial = self.config.spec.serial
        rows = x[:, 0]
        if serial == "bilstm_cnn":
            sequence, _ = self.lstm(rows)
            image = self.bridge(sequence).unsqueeze(1)
            return self.pool(_positions(self.cnn(image)))
        if serial == "cnn_bilstm":
            feature_map = self.cnn(x)
            sequence = feature_map.permute(0, 2, 1, 3).flatten(2)  # (B, rows, C * cols)
            out, _ = self.lstm(sequence)
            return self.pool(out)
        parts = []
        if self.cnn is not None:
            parts.append(self.cnn_pool(_positions(self.cnn(x))))
        if self.lstm is not None:
            out, _ = self.lstm(rows)
            parts.append(self.lstm_pool(out))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, x: torch.Tensor) -> HashNetOutput:
        fc = self.fc(self.fused_features(x))
        hash_probs = torch.sigmoid(self.hash_layer(self.dropout(fc)))
        logits = self.classifier(hash_probs)
        ratings = None if self.rating_head is None else self.rating_head(fc)
        return HashNetOutput(fc=fc, hash_probs=hash_probs, logits=logits, rating_logits=ratings)


@dataclass(frozen=True)
class NormalisationStats:
    """How raw ROI values were mapped to [0, 1]; stored with the model so queries get the same map."""

    mode: str  # "hu": fixed HU window; "percentile": training-set 1st/99th percentiles
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalisationStats:
        return cls(mode=str(data["mode"]), low=float(data["low"]), high=float(data["high"]))


def _as_roi_stack(images: np.ndarray) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 2 and array.shape == (ROI_SIZE, ROI_SIZE):
        array = array[None]
    elif array.ndim == 2 and array.shape[1] == ROI_SIZE * ROI_SIZE:
        array = array.reshape(-1, ROI_SIZE, ROI_SIZE)
    elif array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (ROI_SIZE, ROI_SIZE):
        raise ValueError(f"ROIs must be (n, {ROI_SIZE}, {ROI_SIZE}), got shape {np.shape(images)}")
    if not np.isfinite(array).all():
        raise ValueError("ROIs hold NaN or infinite values")
    return array


def fit_normalisation(images: np.ndarray, mode: str = "auto") -> NormalisationStats:
    """Choose the map from training ROIs: ``auto`` picks ``hu`` when the 1st percentile < -300."""
    array = _as_roi_stack(images)
    if mode not in ("auto", "hu", "percentile"):
        raise ValueError(f"normalisation mode must be 'auto', 'hu' or 'percentile', got {mode!r}")
    if array.size == 0:
        raise ValueError("cannot fit normalisation on zero ROIs")
    if mode == "auto":
        mode = "hu" if float(np.percentile(array, 1)) < HU_DETECTION_THRESHOLD else "percentile"
    if mode == "hu":
        return NormalisationStats("hu", *HU_WINDOW)
    low, high = (float(v) for v in np.percentile(array, [1, 99]))
    if high <= low:  # constant data: any positive span keeps the map finite
        high = low + 1.0
    return NormalisationStats("percentile", low, high)


def normalise_rois(
    images: np.ndarray, stats: NormalisationStats | None = None, mode: str = "auto"
) -> tuple[np.ndarray, NormalisationStats]:
    """Map ROIs to [0, 1] and shape them (n, 1, 32, 32) float32, ready for :class:`HashNet`.

    Rule: with ``stats=None`` (training) the map is fitted on ``images``: Hounsfield data
    (detected because their 1st percentile is below -300 HU, which only air/lung reaches; or
    ``mode="hu"``) are clipped to the fixed window -1200..600 HU; anything else (``mode=
    "percentile"``, e.g. 0..1 or 0..255 images) uses the 1st/99th percentiles of these training
    ROIs as the window. Values are then scaled linearly and clipped to [0, 1]. With ``stats``
    given (queries, test set, index) the stored map is applied unchanged, so every image meets
    the network on the scale it was trained on. Accepts (n, 32, 32), (n, 1024), (n, 1, 32, 32)
    or one (32, 32) ROI.
    """
    array = _as_roi_stack(images)
    if stats is None:
        stats = fit_normalisation(array, mode)
    scaled = (array - np.float32(stats.low)) / np.float32(stats.high - stats.low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)[:, None].astype(np.float32, copy=False), stats
