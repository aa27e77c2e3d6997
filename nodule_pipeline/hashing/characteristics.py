"""The readers' nine ratings as distributions a network can predict and a distance can compare.

The report's graded relevance (:func:`~nodule_pipeline.hashing.metrics.graded_gain`) calls two
nodules alike when their ratings are: ordinal ratings by their difference over the scale,
categorical ones (internal structure, calcification) by equality, averaged over the ratings
both have. Here each rating is a block of its scale's levels (5 for most, 4 and 6 for the
categorical two: 45 columns): a reader rating is one-hot in its block (a median between two
levels split between them), a prediction is a softmax over the block. Then

    expected distance(q, d) = mean over shared ratings of  sum_l p_q(l) * dist(l, r_d)

is exactly the report's distance when ``q`` is one-hot too, and otherwise the distance a
library nodule is *expected* to have from a query whose ratings the network only estimates:
ranking by it is ranking by expected gain, the order nDCG rewards. Training uses the blocks
three ways:

- as targets of an auxiliary head on ``fc`` (HSCNN-style; cross-entropy per rating,
  :func:`rating_loss`), so the model predicts how readers would describe a query;
- as the graded similarity of two nodules in the pairwise term (:func:`rating_similarity`);
- at search time, a query's predicted blocks against the library's reader blocks
  (:func:`rating_distances`), the distance the hierarchical search re-ranks its pool by.

A missing rating (a table without characteristics, or a null cell) is NaN over its block and
leaves the block out; a pair sharing no rating has no rating distance (NaN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nodule_pipeline.hashing.metrics import LIDC_SCALES, RATING_NAMES

if TYPE_CHECKING:  # the training terms take tensors; searching by a library nodule needs no torch
    import torch


def _blocks() -> list[tuple[str, int, int]]:
    """(rating, first column, levels) of each rating's block."""
    blocks, start = [], 0
    for name in RATING_NAMES:
        scale = LIDC_SCALES[name]
        levels = int(scale.high - scale.low) + 1
        blocks.append((name, start, levels))
        start += levels
    return blocks


BLOCKS = _blocks()
ENCODED_WIDTH = sum(levels for _, _, levels in BLOCKS)
"""Columns of an encoding: one per level of each of the nine ratings (45)."""


def _level_distances() -> list[np.ndarray]:
    """Per rating, the (levels, levels) distance between two levels: |a - b| / span for an ordinal
    rating, [a != b] for a categorical one (the report's per-rating distance)."""
    matrices = []
    for name, _, levels in BLOCKS:
        scale, grid = LIDC_SCALES[name], np.arange(levels, dtype=np.float32)
        gap = np.abs(grid[:, None] - grid[None, :])
        matrices.append((gap > 0).astype(np.float32) if scale.categorical else gap / (scale.high - scale.low))
    return matrices


LEVEL_DISTANCES = _level_distances()


def encode_ratings(ratings: np.ndarray) -> np.ndarray:
    """(n, 9) reader ratings in :data:`RATING_NAMES` order (NaN where missing) -> (n, 45) float32
    one-hot blocks, NaN over a missing rating's block. An ordinal median between two levels
    (3.5) is split between them; a categorical value is rounded; a value off its scale is missing."""
    ratings = np.asarray(ratings, dtype=np.float64)
    if ratings.ndim != 2 or ratings.shape[1] != len(RATING_NAMES):
        raise ValueError(f"ratings must be (n, {len(RATING_NAMES)}), got shape {ratings.shape}")
    out = np.full((len(ratings), ENCODED_WIDTH), np.nan, dtype=np.float32)
    rows = np.arange(len(ratings))
    for column, (name, start, levels) in enumerate(BLOCKS):
        scale = LIDC_SCALES[name]
        level = ratings[:, column] - scale.low
        if scale.categorical:
            level = np.rint(level)
        valid = np.isfinite(level) & (level >= 0) & (level <= levels - 1)
        block = np.zeros((len(ratings), levels), dtype=np.float32)
        low = np.floor(np.where(valid, level, 0)).astype(np.int64)
        high = np.minimum(low + 1, levels - 1)
        upper = np.where(valid, level, 0) - low
        block[rows, high] += upper
        block[rows, low] += 1 - upper
        out[valid, start : start + levels] = block[valid]
    return out


def has_ratings(encoded: np.ndarray) -> bool:
    """Whether any row carries any rating (a table the rating terms can learn from)."""
    return bool(np.isfinite(encoded).any())


def _expected_distances(query: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed expected per-rating distances (q, n) and the number of ratings each pair shares."""
    summed = np.zeros((len(query), len(database)), dtype=np.float32)
    shared = np.zeros_like(summed)
    for (_, start, levels), distance in zip(BLOCKS, LEVEL_DISTANCES, strict=True):
        q, d = query[:, start : start + levels], database[:, start : start + levels]
        both = np.isfinite(q[:, :1]) & np.isfinite(d[:, 0])[None, :]
        summed += np.where(both, np.nan_to_num(q) @ distance @ np.nan_to_num(d).T, 0)
        shared += both
    return summed, shared


def rating_distances(query: np.ndarray, database: np.ndarray) -> np.ndarray:
    """(q, n) expected rating distance of each database nodule from each query, in [0, 1]: the
    query's blocks may be predicted distributions, the database's reader one-hots. NaN where a
    pair shares no rating."""
    query = np.asarray(query, dtype=np.float32).reshape(-1, ENCODED_WIDTH)
    database = np.asarray(database, dtype=np.float32).reshape(-1, ENCODED_WIDTH)
    summed, shared = _expected_distances(query, database)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(shared > 0, summed / shared, np.nan).astype(np.float32)


def rating_similarity(encoded: torch.Tensor, same_label: torch.Tensor) -> torch.Tensor:
    """(B, B) graded similarity of a batch's nodules for the pairwise term: ``same_label`` times
    one minus their rating distance (the report's graded gain); pairs sharing no rating keep the
    binary label match, so a table without characteristics trains as with labels alone."""
    import torch

    summed = torch.zeros(len(encoded), len(encoded), device=encoded.device, dtype=same_label.dtype)
    shared = torch.zeros_like(summed)
    for (_, start, levels), distance in zip(BLOCKS, LEVEL_DISTANCES, strict=True):
        block = encoded[:, start : start + levels].to(summed.dtype)
        present = torch.isfinite(block[:, 0])
        both = (present[:, None] & present[None, :]).to(summed.dtype)
        values = torch.nan_to_num(block)
        summed += both * (values @ torch.as_tensor(distance, device=block.device, dtype=block.dtype) @ values.T)
        shared += both
    distance = torch.where(shared > 0, summed / shared.clamp(min=1), torch.zeros_like(summed))
    return same_label * (1 - distance)


def rating_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The rating head's (B, 45) logits as a softmax over each rating's levels."""
    import torch

    return torch.cat([torch.softmax(logits[:, s : s + n].float(), dim=1) for _, s, n in BLOCKS], dim=1)


def rating_loss(logits: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the rating head against the readers' blocks, averaged over the ratings
    present (0 when none is): each rating a small classification over its levels."""
    import torch

    total = logits.sum() * 0
    count = 0
    for _, start, levels in BLOCKS:
        target = encoded[:, start : start + levels]
        present = torch.isfinite(target[:, 0])
        if bool(present.any()):
            log_probs = torch.log_softmax(logits[present, start : start + levels].float(), dim=1)
            total = total - (target[present].float() * log_probs).sum()
            count += int(present.sum())
    return total / max(count, 1)


def most_likely(predicted: np.ndarray) -> dict[str, int]:
    """A query's predicted blocks (45 values) as the rating the readers most likely gave, on each
    rating's own scale ({"subtlety": 4, ...}): what the page shows beside the query."""
    predicted = np.asarray(predicted, dtype=np.float32).reshape(ENCODED_WIDTH)
    return {
        name: int(LIDC_SCALES[name].low) + int(np.argmax(predicted[start : start + levels]))
        for name, start, levels in BLOCKS
    }
