"""Training, encoding and storing the deep hashing network.

The paper (section 1.3.1, last paragraph) trains with cross-entropy + L2 0.01, Adam, batch 32,
25 epochs: :meth:`TrainConfig.paper`. The default recipe, chosen on real LIDC nodules, adds the
hashing terms of :mod:`nodule_pipeline.hashing.objective`, augmentation
(:mod:`nodule_pipeline.hashing.augment`), a one-cycle learning-rate schedule and a validation
split of training patients for model selection and early stopping. Pure torch/numpy: the
Dagster asset calls these functions.

Reproducibility: on the CPU the same inputs, configs and seed give bit-identical weights (torch
RNG seeded inside a forked RNG state so the caller's is untouched, shuffles and augmentation
from seeded generators, a fixed thread count: ``num_threads``, recorded on the card, not the
host's core count, which would change how reductions are split and so the weights). On CUDA
cuDNN kernels and mixed precision are not bit-exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from nodule_pipeline.hashing.augment import augment_batch
from nodule_pipeline.hashing.characteristics import (
    ENCODED_WIDTH,
    encode_ratings,
    has_ratings,
    rating_probabilities,
)
from nodule_pipeline.hashing.codes import Encoded
from nodule_pipeline.hashing.model_files import FORMAT, META_FILE, WEIGHTS_FILE, read_model_card
from nodule_pipeline.hashing.network import HashNet, NetworkConfig, NormalisationStats, normalise_rois
from nodule_pipeline.hashing.objective import ObjectiveWeights, hashing_objective
from nodule_pipeline.storage import reads_folder, replace_dir

LR_SCHEDULES = ("one_cycle", "constant")
RECIPES = ("default", "paper")
"""``default``: the recipe chosen on real nodules; ``paper``: cross-entropy only, as Hao et al. trained."""
MIN_VALIDATION_PATIENTS = 5
"""Below this many validation patients (fraction x training patients) there is no validation split."""
MIN_TRAINING_ROIS = 100
"""Fewer training ROIs than this (a dozen LIDC patients) teach the network nothing it can search
by: such a model is trained briefly, as a placeholder (see :func:`fit_to_data`)."""
PLACEHOLDER_EPOCHS = 3
TRAINING_THREADS = 2
"""torch's intra-op threads while training, whatever the host has: the same data, code and seed
then give the same weights on a 2-core laptop and a 64-core server (2: about 1.9x the images/s
of one thread on 2 cores; more threads split the sums differently, so change it knowingly)."""


@dataclass(frozen=True)
class TrainConfig:
    """How the network is trained; the defaults are the recipe chosen on real LIDC nodules.

    Objective (see :mod:`nodule_pipeline.hashing.objective`): cross-entropy on the classifier plus
    ``pairwise_weight`` x DPSH likelihood, ``quantization_weight`` x quantization,
    ``balance_weight`` x bit balance and ``decorrelation_weight`` x decorrelation; on a table
    with the readers' characteristics, ``ratings_weight`` x the rating head's error and, with
    ``graded_pairwise``, the pairwise term on graded similarity (a table without them trains
    without both). The paper's objective is cross-entropy alone (:meth:`paper`). The rating
    terms were chosen on real nodules over three patient splits: they keep accuracy and raise
    the within-class nDCG@10 of the hierarchical search from 0.865 to 0.92 (its rating re-rank).

    Recipe: AdamW (``l2`` = the paper's lambda 0.01 as decoupled weight decay on weight matrices
    and kernels; ``l2_mode="coupled"`` adds ``lambda/2 ||W||^2`` to the loss instead, which in our
    runs collapsed the hash layer and is kept only to show that), ``lr_schedule="one_cycle"``
    (warm-up over the first 15% of the steps, then cosine decay to ~0), on-the-fly augmentation
    (``augment``: the 8 flips/rotations of the square; ``shift_pixels``; ``hu_jitter``: standard
    deviation of a per-ROI offset in HU, in raw units for non-HU tables), and a validation split of
    ``validation_fraction`` of the training *patients* (never the test split): the epoch with the
    lowest validation loss is the model kept, and training stops after
    ``early_stopping_patience`` epochs without improvement (0: never early).
    ``balance_classes`` weights the cross-entropy by inverse class frequency.
    ``mixed_precision`` applies on CUDA only; ``device`` "auto" picks CUDA when present.
    ``num_threads`` is torch's thread count while training (:data:`TRAINING_THREADS`); None, as
    cards written before it was fixed say, uses the host's count and is not reproducible.
    """

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "one_cycle"
    l2: float = 0.01
    l2_mode: str = "decoupled"
    augment: bool = True
    shift_pixels: int = 2
    hu_jitter: float = 0.0
    pairwise_weight: float = 1.0
    quantization_weight: float = 0.1
    balance_weight: float = 5.0
    decorrelation_weight: float = 5.0
    ratings_weight: float = 1.0
    graded_pairwise: bool = True
    validation_fraction: float = 0.1
    early_stopping_patience: int = 10
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True
    num_threads: int | None = TRAINING_THREADS
    balance_classes: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (BatchNorm), got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if self.l2_mode not in ("decoupled", "coupled"):
            raise ValueError(f"l2_mode must be 'decoupled' or 'coupled', got {self.l2_mode!r}")
        if not 0 <= self.shift_pixels <= 8:
            raise ValueError(f"shift_pixels must be in 0..8, got {self.shift_pixels}")
        weights = ("pairwise_weight", "quantization_weight", "balance_weight", "decorrelation_weight", "ratings_weight")
        for name in ("hu_jitter", *weights):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be positive or None, got {self.num_threads}")

    @classmethod
    def paper(cls, **overrides: Any) -> TrainConfig:
        """The paper's recipe: cross-entropy only (+ L2 0.01), Adam at a constant 1e-3, batch 32,
        25 epochs, no augmentation, no validation; the last epoch is the model."""
        paper = cls(
            epochs=25,
            lr_schedule="constant",
            augment=False,
            shift_pixels=0,
            pairwise_weight=0.0,
            quantization_weight=0.0,
            balance_weight=0.0,
            decorrelation_weight=0.0,
            ratings_weight=0.0,
            graded_pairwise=False,
            validation_fraction=0.0,
            early_stopping_patience=0,
        )
        return replace(paper, **overrides)

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named recipe (:data:`RECIPES`) with the overrides that are not None (asset and CLI options)."""
        if name not in RECIPES:
            raise ValueError(f"unknown training recipe {name!r}; use one of {RECIPES}")
        base = cls() if name == "default" else cls.paper()
        return replace(base, **{key: value for key, value in overrides.items() if value is not None})

    @property
    def objective(self) -> ObjectiveWeights:
        return ObjectiveWeights(
            1.0,
            self.pairwise_weight,
            self.quantization_weight,
            self.balance_weight,
            self.decorrelation_weight,
            self.ratings_weight,
            self.graded_pairwise,
        )

    @property
    def uses_ratings(self) -> bool:
        """Whether a term of the objective reads the readers' characteristics."""
        return bool(self.ratings_weight or (self.graded_pairwise and self.pairwise_weight))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from its dict. A field the dict lacks was added after it was written, when
        every model trained with the paper's recipe, so it takes the paper's value: an old card
        reads as what it trained with, not as today's defaults."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**{**asdict(cls.paper()), **data})


def fit_to_data(config: TrainConfig, training_rois: int) -> tuple[TrainConfig, str | None]:
    """The config to train ``training_rois`` ROIs with, and why it differs, if it does: below
    :data:`MIN_TRAINING_ROIS` the full schedule would only memorise a handful of ROIs, so the
    model gets :data:`PLACEHOLDER_EPOCHS` epochs, enough for an index to search until more
    patients arrive and it is retrained."""
    if training_rois >= MIN_TRAINING_ROIS or config.epochs <= PLACEHOLDER_EPOCHS:
        return config, None
    note = (
        f"only {training_rois} training ROIs, fewer than the {MIN_TRAINING_ROIS} a model needs to learn from: "
        f"trained {PLACEHOLDER_EPOCHS} epochs instead of {config.epochs}, a placeholder to search with; "
        f"retrain once {MIN_TRAINING_ROIS} ROIs have arrived"
    )
    return replace(config, epochs=PLACEHOLDER_EPOCHS), note


@dataclass(frozen=True)
class EpochStats:
    """One epoch: mean training cross-entropy (``loss``: without the hashing terms and the L2
    term, so it compares with ``val_loss``) and the whole weighted objective, running training
    accuracy (dropout and augmentation on), validation figures (None without validation), wall
    seconds of the training pass and its throughput."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    images_per_s: float
    objective: float | None = None  # the whole weighted objective (None in cards written before it existed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainedModel:
    """A trained network (eval mode, on CPU) with everything needed to encode new ROIs the same way."""

    module: HashNet
    network: NetworkConfig
    config: TrainConfig
    normalisation: NormalisationStats
    history: list[EpochStats] = field(default_factory=list)
    device: str = "cpu"
    seconds: float = 0.0
    images_per_s: float = 0.0
    selected_epoch: int = 0  # the epoch whose weights these are (the best on validation, else the last)
    validation_patients: int = 0  # training patients held out for validation (0: none)
    validation: str = ""  # that in words, or why there was no validation ("" in models saved before)

    @property
    def validated(self) -> bool:
        """Whether validation picked the epoch kept (validation figures in the history)."""
        return any(epoch.val_loss is not None for epoch in self.history)

    @property
    def used_config(self) -> TrainConfig:
        """:attr:`config` as it trained: ``validation_fraction`` 0 where no validation split was
        carved out (too few patients), which trains exactly as the fraction asked for did."""
        return self.config if self.validated else replace(self.config, validation_fraction=0.0)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block and restore it (it is process-wide)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def validation_patients(
    patient_ids: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of rows held out for validation: whole patients, stratified by majority label.

    All False (train on everything, no model selection) when the fraction rounds to no patient
    or there are fewer than :data:`MIN_VALIDATION_PATIENTS` patients: a validation set of one or
    two patients picks epochs by noise.
    """
    patients, inverse = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    if len(patients) < MIN_VALIDATION_PATIENTS / fraction:
        return np.zeros(len(inverse), dtype=bool)
    majority = np.rint(np.bincount(inverse, weights=labels) / np.bincount(inverse)).astype(int)
    chosen: list[int] = []
    for stratum in np.unique(majority):
        members = np.flatnonzero(majority == stratum)
        members = members[rng.permutation(len(members))]
        chosen.extend(members[: round(fraction * len(members))].tolist())
    return np.isin(inverse, chosen)


def validation_rows(
    patient_ids: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """:func:`validation_patients`, or none held out when validation is off (fraction 0)."""
    if fraction > 0:
        return validation_patients(patient_ids, labels, fraction, rng)
    return np.zeros(len(patient_ids), dtype=bool)


def validation_note(patient_ids: np.ndarray, held_out: np.ndarray, fraction: float) -> str:
    """Whether training had a validation split, in words for the model card: how many patients
    it held, or why there was none."""
    patient_ids = np.asarray(patient_ids).astype(str)
    patients = len(np.unique(patient_ids))
    if fraction == 0:
        return "off: validation_fraction 0, the last epoch kept"
    if held_out.any():
        held = len(np.unique(patient_ids[held_out]))
        return f"ran: {held} of {patients} training patients held out, the epoch of least validation loss kept"
    needed = math.ceil(MIN_VALIDATION_PATIENTS / fraction)
    if patients < needed:
        return (
            f"skipped: {patients} training patients, fewer than {needed} ({MIN_VALIDATION_PATIENTS} validation "
            f"patients at validation_fraction {fraction}); trained on all, the last epoch kept"
        )
    return (
        f"skipped: validation_fraction {fraction} of {patients} training patients rounds to none; the last epoch kept"
    )


def _param_groups(module: torch.nn.Module, l2: float) -> list[dict[str, Any]]:
    decay = [p for p in module.parameters() if p.ndim >= 2]
    rest = [p for p in module.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": l2}, {"params": rest, "weight_decay": 0.0}]


def _make_optimizer(module: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(module, config.l2)
    optimizer = torch.optim.AdamW if config.l2_mode == "decoupled" else torch.optim.Adam
    try:  # fused: one kernel per step instead of ~10 elementwise passes over the weights
        return optimizer(groups, lr=config.learning_rate, fused=True)
    except (RuntimeError, TypeError):
        return optimizer(groups, lr=config.learning_rate)


def _evaluate(
    module: HashNet, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp: bool, device: torch.device
) -> tuple[float, float]:
    module.eval()
    total, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = module(xb).logits.float()
            total += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    module.train()
    return total / len(x), correct / len(x)


def _check_inputs(images: np.ndarray, labels: np.ndarray, patient_ids: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if len(images) != len(labels) or len(labels) != len(patient_ids):
        raise ValueError(f"images ({len(images)}), labels ({len(labels)}) and patient_ids ({len(patient_ids)}) differ")
    if len(labels) < 2:
        raise ValueError(f"need at least 2 training ROIs, got {len(labels)}")
    if not np.isin(labels, np.arange(num_classes)).all():
        raise ValueError(f"labels must be integers in 0..{num_classes - 1}")
    return labels.astype(np.int64)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if config.lr_schedule == "constant":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )


def _batch_bounds(n: int, batch_size: int) -> list[int]:
    bounds = [*range(0, n, batch_size), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]  # BatchNorm cannot train on a batch of one: fold it into the previous batch
    return bounds


def canonical_order(images: np.ndarray, labels: np.ndarray, patient_ids: np.ndarray) -> np.ndarray:
    """A row order that depends only on the rows' content (patient, label, pixels), not on where
    they stand: training visits rows in this order before shuffling, so the same table in any
    row order trains the same model."""
    pixels = np.ascontiguousarray(np.asarray(images, dtype=np.float32).reshape(len(images), -1))
    digests = np.array(
        [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "big") for row in pixels],
        dtype=np.uint64,
    )
    return np.lexsort((digests, np.asarray(labels), np.asarray(patient_ids).astype(str)))


def _rating_targets(ratings: np.ndarray | None, rows: int, config: TrainConfig) -> np.ndarray | None:
    """The encoded ratings to train on, or None when the recipe or the table has none."""
    if ratings is None or not config.uses_ratings:
        return None
    ratings = np.asarray(ratings, dtype=np.float64)
    if len(ratings) != rows:
        raise ValueError(f"ratings ({len(ratings)}) and images ({rows}) differ")
    encoded = encode_ratings(ratings)
    return encoded if has_ratings(encoded) else None


def train_hash_model(
    images: np.ndarray,
    labels: np.ndarray,
    patient_ids: np.ndarray,
    network: NetworkConfig | None = None,
    config: TrainConfig | None = None,
    progress: Callable[[EpochStats], None] | None = None,
    ratings: np.ndarray | None = None,
) -> TrainedModel:
    """Train :class:`HashNet` on training-split ROIs (n, 32, 32) with labels and patient ids.

    ``ratings`` (n, 9): the readers' characteristics in
    :data:`~nodule_pipeline.hashing.metrics.RATING_NAMES` order, NaN where missing (see
    :func:`~nodule_pipeline.hashing.metrics.ratings_matrix`). When the recipe weighs them and the
    table has any, the network gets a rating head (``network.rating_outputs``); otherwise the
    model trains, and is saved, exactly as without them.

    Validation patients are carved out of these rows (pass training rows only: the test split
    must never be touched); normalisation is fitted on the rows actually trained on. The rows'
    order does not matter (:func:`canonical_order`). With a
    validation split the weights of the epoch with the lowest validation cross-entropy are
    returned. ``progress`` is called after every epoch (e.g. to log to Dagster). Returns the model
    in eval mode on the CPU, whatever device trained it.
    """
    network = network or NetworkConfig()
    config = config or TrainConfig()
    y_all = _check_inputs(images, labels, patient_ids, network.num_classes)
    encoded = _rating_targets(ratings, len(y_all), config)
    network = replace(network, rating_outputs=ENCODED_WIDTH if encoded is not None and config.ratings_weight else 0)
    order = canonical_order(images, y_all, patient_ids)
    images, y_all, patient_ids = np.asarray(images)[order], y_all[order], np.asarray(patient_ids)[order]
    encoded = None if encoded is None else encoded[order]
    rng = np.random.default_rng(config.seed)
    held_out = validation_rows(patient_ids, y_all, config.validation_fraction, rng)
    if (~held_out).sum() < 2:
        raise ValueError("fewer than 2 ROIs left to train on after holding out validation patients")
    validation = validation_note(patient_ids, held_out, config.validation_fraction)
    images = np.asarray(images)
    x_fit, stats = normalise_rois(images[~held_out])
    device = resolve_device(config.device)
    amp = device.type == "cuda" and config.mixed_precision
    devices = [device.index or 0] if device.type == "cuda" else []
    jitter = config.hu_jitter / (stats.high - stats.low)

    with torch_threads(config.num_threads), torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        module = HashNet(network).to(device)
        module.train()
        optimizer = _make_optimizer(module, config)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        x = torch.from_numpy(x_fit).to(device)
        y = torch.from_numpy(y_all[~held_out]).to(device)
        targets = None if encoded is None else torch.from_numpy(encoded[~held_out]).to(device)
        x_val = y_val = None
        if held_out.any():
            x_val = torch.from_numpy(normalise_rois(images[held_out], stats)[0]).to(device)
            y_val = torch.from_numpy(y_all[held_out]).to(device)
        weight = None
        if config.balance_classes:
            counts = np.bincount(y_all[~held_out], minlength=network.num_classes).astype(np.float64)
            weight = torch.tensor(len(y) / (network.num_classes * np.maximum(counts, 1)), dtype=torch.float32)
            weight = weight.to(device)

        history: list[EpochStats] = []
        best: tuple[float, dict[str, torch.Tensor] | None, int] = (math.inf, None, 0)
        train_seconds = 0.0
        n = len(y)
        bounds = _batch_bounds(n, config.batch_size)
        scheduler = _make_scheduler(optimizer, config, len(bounds) - 1)
        for epoch in range(1, config.epochs + 1):
            order = torch.from_numpy(rng.permutation(n)).to(device)
            loss_sum = torch.zeros((), device=device)
            objective_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            started = time.perf_counter()
            for start, stop in pairwise(bounds):
                index = order[start:stop]
                xb, yb = x[index], y[index]
                xb = augment_batch(xb, generator, config.augment, config.shift_pixels, jitter)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                    out = module(xb)
                loss, cross_entropy = hashing_objective(
                    out.logits,
                    out.hash_probs,
                    yb,
                    config.objective,
                    weight,
                    out.rating_logits,
                    None if targets is None else targets[index],
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                loss_sum += cross_entropy.detach() * len(index)
                objective_sum += loss.detach() * len(index)
                correct += (out.logits.detach().argmax(1) == yb).sum()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            train_seconds += seconds
            val_loss = val_accuracy = None
            if x_val is not None:
                val_loss, val_accuracy = _evaluate(module, x_val, y_val, 256, amp, device)
                if val_loss < best[0]:
                    state = {key: value.detach().clone() for key, value in module.state_dict().items()}
                    best = (val_loss, state, epoch)
            stats_epoch = EpochStats(
                epoch=epoch,
                loss=float(loss_sum) / n,
                accuracy=int(correct) / n,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                seconds=seconds,
                images_per_s=n / seconds if seconds > 0 else 0.0,
                objective=float(objective_sum) / n,
            )
            history.append(stats_epoch)
            if progress is not None:
                progress(stats_epoch)
            patience = config.early_stopping_patience
            if patience and best[1] is not None and epoch - best[2] >= patience:
                break
        if best[1] is not None:
            module.load_state_dict(best[1])

    module.to("cpu").eval()
    trained_images = n * len(history)
    return TrainedModel(
        module=module,
        network=network,
        config=config,
        normalisation=stats,
        history=history,
        device=str(device),
        seconds=train_seconds,
        images_per_s=trained_images / train_seconds if train_seconds > 0 else 0.0,
        selected_epoch=best[2] if best[1] is not None else len(history),
        validation_patients=len(np.unique(patient_ids[held_out].astype(str))),
        validation=validation,
    )


def encode(model: TrainedModel, images: np.ndarray, batch_size: int = 256) -> Encoded:
    """Hash codes, fc features and class probabilities for ROIs (raw values, normalised here with
    the model's stored map). Runs where the module's weights are (CPU after training/loading)."""
    module = model.module
    if np.size(images) == 0:
        x = np.zeros((0, 1, 32, 32), np.float32)
    else:
        x, _ = normalise_rois(images, model.normalisation)
    device = next(module.parameters()).device
    codes, fcs, probs, ratings = [], [], [], []
    module.eval()
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            out = module(torch.from_numpy(x[start : start + batch_size]).to(device))
            codes.append((out.hash_probs > 0.5).cpu().numpy())
            fcs.append(out.fc.float().cpu().numpy())
            probs.append(torch.softmax(out.logits.float(), dim=1).cpu().numpy())
            if out.rating_logits is not None:
                ratings.append(rating_probabilities(out.rating_logits).cpu().numpy())
    net = model.network

    def stacked(parts: list[np.ndarray], width: int, dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, width), dtype=dtype)

    all_probs = stacked(probs, net.num_classes, np.float32)
    return Encoded(
        codes=stacked(codes, net.bits, bool),
        fc=stacked(fcs, net.fc_dim, np.float32),
        probs=all_probs,
        predicted=all_probs.argmax(axis=1).astype(np.int8),
        ratings=stacked(ratings, net.rating_outputs, np.float32) if net.rating_outputs else None,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_model(model: TrainedModel, folder: Path, card: dict[str, Any] | None = None) -> None:
    """Write ``weights.pt`` (state_dict) and ``model.json`` (configs, normalisation, history,
    weights checksum, the caller's ``card``) into ``folder``, atomically (old or new, never a mix)."""
    folder = Path(folder)
    meta = {
        "format": FORMAT,
        "network": model.network.to_dict(),
        "training": model.config.to_dict(),
        "normalisation": model.normalisation.to_dict(),
        "history": [epoch.to_dict() for epoch in model.history],
        "device": model.device,
        "seconds": model.seconds,
        "images_per_s": model.images_per_s,
        "selected_epoch": model.selected_epoch,
        "validation_patients": model.validation_patients,
        "validation": model.validation,
        "torch_version": torch.__version__,
        "card": card or {},
    }
    json.dumps(meta)  # a card that is not JSON fails here, before the old folder is touched

    def fill(tmp: Path) -> None:
        # Serialised in memory and written by Python: a full disk is then an OSError naming the
        # errno, where torch's own file writer reports an opaque RuntimeError.
        buffer = io.BytesIO()
        torch.save({key: value.detach().cpu() for key, value in model.module.state_dict().items()}, buffer)
        weights = buffer.getvalue()
        (tmp / WEIGHTS_FILE).write_bytes(weights)
        checksum = hashlib.sha256(weights).hexdigest()
        (tmp / META_FILE).write_text(json.dumps({**meta, "weights_sha256": checksum}, indent=2))

    replace_dir(folder, fill)


@reads_folder
def load_model(folder: Path, map_location: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild a model written by :func:`save_model`; the weights file is checked against its
    checksum and read with ``weights_only=True`` (tensors only, no arbitrary pickle)."""
    folder = Path(folder)
    meta = read_model_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file missing")
    expected = meta.get("weights_sha256")
    if expected and _sha256(weights) != expected:
        raise ValueError(f"{weights}: checksum does not match model.json (file changed or corrupted)")
    network = NetworkConfig.from_dict(meta["network"])
    module = HashNet(network)
    module.load_state_dict(torch.load(weights, map_location=map_location, weights_only=True), strict=True)
    module.to(map_location).eval()
    history = [EpochStats(**epoch) for epoch in meta.get("history", [])]
    return TrainedModel(
        module=module,
        network=network,
        config=TrainConfig.from_dict(meta["training"]),
        normalisation=NormalisationStats.from_dict(meta["normalisation"]),
        history=history,
        device=meta.get("device", "cpu"),
        seconds=float(meta.get("seconds", 0.0)),
        images_per_s=float(meta.get("images_per_s", 0.0)),
        selected_epoch=int(meta.get("selected_epoch", len(history))),
        validation_patients=int(meta.get("validation_patients", 0)),
        validation=str(meta.get("validation", "")),
    )


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, positive: int = 1) -> dict[str, float]:
    """Accuracy; precision/recall/F1 of the ``positive`` (malignant) class and their macro means
    over the classes seen (at least 0 and 1); confusion counts for the positive class. A ratio
    with an empty denominator is 0.0."""
    y_true, y_pred = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D shapes")
    if len(y_true) == 0:
        raise ValueError("no predictions to score")

    def ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    per_class = {}
    for cls in sorted(set(y_true.tolist()) | set(y_pred.tolist()) | {0, 1}):
        tp = int(np.sum((y_pred == cls) & (y_true == cls)))
        fp = int(np.sum((y_pred == cls) & (y_true != cls)))
        fn = int(np.sum((y_pred != cls) & (y_true == cls)))
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        f1 = ratio(2 * tp, 2 * tp + fp + fn)  # = 2PR/(P+R), exact in integers
        per_class[cls] = (tp, fp, fn, precision, recall, f1)
    tp, fp, fn, precision, recall, f1 = per_class.get(positive, (0, 0, 0, 0.0, 0.0, 0.0))
    return {
        "n": len(y_true),
        "accuracy": float(np.mean(y_true == y_pred)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "precision_macro": float(np.mean([v[3] for v in per_class.values()])),
        "recall_macro": float(np.mean([v[4] for v in per_class.values()])),
        "f1_macro": float(np.mean([v[5] for v in per_class.values()])),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": len(y_true) - tp - fp - fn,
    }
