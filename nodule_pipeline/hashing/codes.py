"""Binary hash codes packed 8 bits to a byte, the form the index stores and compares, and the
network's outputs per ROI (:class:`Encoded`: codes, features, class and rating predictions).

Bit order is big-endian within a byte (``np.packbits`` default): code bit ``j`` is bit
``7 - j % 8`` of byte ``j // 8``. Hamming distance does not depend on the order, but a stored
index must be unpacked with the same rule, so it is fixed here in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check_bits(bits: int) -> None:
    if bits <= 0 or bits % 8:
        raise ValueError(f"code length must be a positive multiple of 8 bits, got {bits}")


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, bits) bool (or 0/1) codes -> (n, bits / 8) uint8, big-endian bit order within a byte."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (n, bits), got shape {codes.shape}")
    _check_bits(codes.shape[1])
    if codes.dtype != np.bool_:
        if codes.size and not np.isin(codes, (0, 1)).all():
            raise ValueError("codes must hold only 0/1 or booleans")
        codes = codes.astype(bool)
    return np.packbits(codes, axis=1, bitorder="big")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """(n, bits / 8) uint8 -> (n, bits) bool; the exact inverse of :func:`pack_codes`."""
    packed = np.asarray(packed)
    _check_bits(bits)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(f"packed codes must be 2-D uint8, got shape {packed.shape} dtype {packed.dtype}")
    if packed.shape[1] != bits // 8:
        raise ValueError(f"packed codes have {packed.shape[1]} bytes per row, {bits} bits need {bits // 8}")
    return np.unpackbits(packed, axis=1, count=bits, bitorder="big").astype(bool)


def code_health(codes: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    """How much a set of codes (n, bits) can rank: the signs of collapse, exactly, in O(n bits).

    ``distinct_codes``; ``mean_bit_entropy`` (bits, 1 = every bit splits the items in half);
    ``constant_bits`` (the same in every item: they rank nothing); ``intra_class_hamming`` and
    ``inter_class_hamming``, the mean distance over pairs of distinct items with the same and
    with different labels (None without such pairs). A pair differs in bit b when one item has
    it and the other not, so over a group of m items with c ones in bit b, c (m - c) pairs differ:
    no pairwise distances are needed.
    """
    codes = np.asarray(codes).astype(bool)
    labels = np.asarray(labels)
    if codes.ndim != 2 or len(codes) != len(labels):
        raise ValueError(f"codes {codes.shape} and labels {labels.shape} must be (n, bits) and (n,)")
    n = len(codes)
    ones = codes.sum(axis=0, dtype=np.int64)
    share = ones / max(n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(share * np.log2(share) + (1 - share) * np.log2(1 - share))
    entropy = np.nan_to_num(entropy, nan=0.0)
    classes = np.unique(labels)
    sizes = {c: int((labels == c).sum()) for c in classes}
    class_ones = {c: codes[labels == c].sum(axis=0, dtype=np.int64) for c in classes}
    intra_pairs = sum(m * (m - 1) // 2 for m in sizes.values())
    intra_sum = sum(float((class_ones[c] * (sizes[c] - class_ones[c])).sum()) for c in classes)
    inter_pairs, inter_sum = 0, 0.0
    for i, a in enumerate(classes):
        for b in classes[i + 1 :]:
            inter_pairs += sizes[a] * sizes[b]
            differ = class_ones[a] * (sizes[b] - class_ones[b]) + (sizes[a] - class_ones[a]) * class_ones[b]
            inter_sum += float(differ.sum())
    return {
        "items": n,
        "bits": codes.shape[1],
        "distinct_codes": len(np.unique(pack_codes(codes), axis=0)) if n else 0,
        "mean_bit_entropy": float(entropy.mean()) if codes.shape[1] else 0.0,
        "constant_bits": int(((ones == 0) | (ones == n)).sum()),
        "intra_class_hamming": intra_sum / intra_pairs if intra_pairs else None,
        "inter_class_hamming": inter_sum / inter_pairs if inter_pairs else None,
    }


@dataclass(frozen=True)
class Encoded:
    """Per ROI: ``codes`` (n, bits) bool (h > 0.5), ``fc`` (n, fc_dim) float32 features,
    ``probs`` (n, classes) float32 softmax, ``predicted`` (n,) int8 argmax class, ``ratings``
    (n, 45) float32 the rating head's distribution over each rating's levels (None for a model
    without one)."""

    codes: np.ndarray
    fc: np.ndarray
    probs: np.ndarray
    predicted: np.ndarray
    ratings: np.ndarray | None = None
