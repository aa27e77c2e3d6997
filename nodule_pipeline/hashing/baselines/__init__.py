"""Baselines of the paper's comparisons (Hao et al. 2022, Table 2 and Figs. 3-4), one small module per method.

Every method is called the same way, on the same raw ROIs the network gets, so the evaluation can
loop over the registries without knowing what a method does inside:

- hashing: ``HASHING_BASELINES[name](train_images, train_labels, bits, seed) -> HashingModel``
  with ``model.encode(images) -> (m, bits) bool``; deep methods also take ``epochs``,
  ``batch_size`` and ``device`` (:func:`fit_hashing_baseline` forwards them only where they apply).
- classifiers: ``CLASSIFIER_BASELINES[name](train_images, train_labels, seed) -> ClassifierModel``
  with ``model.predict(images) -> (m,) int64``.

``train_images`` are (n, 32, 32) ROIs as the ROI table holds them (Hounsfield units or any other
scale); each method maps intensities with the network's :func:`~nodule_pipeline.hashing.network.normalise_rois`
(fitted on the training ROIs) and does its own feature step (:mod:`.features`). The paper's deep
classifier variants (CNN, BiLSTM, +AM, serial, parallel) are ``HashNet`` configurations
(``NetworkConfig.variant``), not baselines here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from nodule_pipeline.hashing.baselines import bre, cnnh, dlbhc, dnnh, dpsh, elm, itq, ksh, lsh, mlh, sh, svm


class HashingModel(Protocol):
    """A trained hashing baseline."""

    @property
    def bits(self) -> int: ...

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> codes (m, bits) bool."""
        ...


class ClassifierModel(Protocol):
    """A trained classification baseline."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Raw ROIs (m, 32, 32) -> class labels (m,) int64."""
        ...


HashingFit = Callable[..., HashingModel]
ClassifierFit = Callable[..., ClassifierModel]

HASHING_BASELINES: dict[str, HashingFit] = {
    "lsh": lsh.fit,
    "sh": sh.fit,
    "bre": bre.fit,
    "itq": itq.fit,
    "mlh": mlh.fit,
    "ksh": ksh.fit,
    "cnnh": cnnh.fit,
    "dlbhc": dlbhc.fit,
    "dnnh": dnnh.fit,
    "dpsh": dpsh.fit,
}
"""Name -> ``fit(train_images, train_labels, bits, seed, ...)``; order = the report's column order: the
paper's (LSH, SH, BRE, ITQ, MLH, KSH, CNNH, DLBHC, DNNH), then DPSH, which the paper does not compare."""

CLASSIFIER_BASELINES: dict[str, ClassifierFit] = {"svm": svm.fit, "elm": elm.fit}
"""Name -> ``fit(train_images, train_labels, seed, ...)``."""

DEEP_HASHING = frozenset({"cnnh", "dlbhc", "dnnh", "dpsh"})
"""Hashing baselines that train a network (and take ``epochs``, ``batch_size``, ``device``)."""

SUPERVISED_HASHING = frozenset({"mlh", "ksh", "cnnh", "dlbhc", "dnnh", "dpsh"})
"""Hashing baselines that use the labels (LSH, SH, BRE and ITQ ignore them)."""

DISPLAY_NAMES: dict[str, str] = {
    "lsh": "LSH",
    "sh": "SH",
    "bre": "BRE",
    "itq": "ITQ",
    "mlh": "MLH",
    "ksh": "KSH",
    "cnnh": "CNNH",
    "dlbhc": "DLBHC",
    "dnnh": "DNNH",
    "dpsh": "DPSH",
    "svm": "SVM",
    "elm": "ELM",
}
"""Method name -> label in tables and figures (the paper's spelling)."""


def fit_hashing_baseline(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    bits: int,
    seed: int = 0,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> HashingModel:
    """Fit one hashing baseline by name; training options (None = the method's default) reach deep methods only."""
    if name not in HASHING_BASELINES:
        raise ValueError(f"unknown hashing baseline {name!r}; valid: {', '.join(HASHING_BASELINES)}")
    options = {"epochs": epochs, "batch_size": batch_size, "device": device} if name in DEEP_HASHING else {}
    options = {key: value for key, value in options.items() if value is not None}
    return HASHING_BASELINES[name](train_images, train_labels, bits, seed, **options)


def fit_classifier_baseline(
    name: str, train_images: np.ndarray, train_labels: np.ndarray, seed: int = 0
) -> ClassifierModel:
    """Fit one classification baseline by name with its defaults."""
    if name not in CLASSIFIER_BASELINES:
        raise ValueError(f"unknown classifier baseline {name!r}; valid: {', '.join(CLASSIFIER_BASELINES)}")
    return CLASSIFIER_BASELINES[name](train_images, train_labels, seed)


__all__ = [
    "CLASSIFIER_BASELINES",
    "DEEP_HASHING",
    "DISPLAY_NAMES",
    "HASHING_BASELINES",
    "SUPERVISED_HASHING",
    "ClassifierModel",
    "HashingModel",
    "fit_classifier_baseline",
    "fit_hashing_baseline",
]
