"""The terms deep hashing adds to cross-entropy so that Hamming distance means something.

Cross-entropy alone (the paper's objective) only asks the hash layer to feed the classifier: on
real CT it collapses to about a hundred codes for thousands of nodules, a third of the bits
constant, the whole class at Hamming 0. Each term here is a mean over a mini-batch of relaxed
codes ``u = 2h - 1`` in (-1, 1) (``h`` the sigmoid hash layer, code bit = ``u > 0``):

- **pairwise likelihood** (DPSH, Li et al. 2016): ``log(1 + e^theta) - s theta`` over every pair,
  ``s = 1`` for the same label, ``theta = span * u_i . u_j / bits``. Same-label codes are drawn
  together and other-label codes pushed apart *in Hamming distance*, which is what flat Hamming
  retrieval ranks by. ``span`` keeps ``theta`` in [-span, span] whatever the code length.
- **quantization**: ``mean((|u| - 1)^2)``; relaxed codes close to +-1 lose little when binarised.
- **bit balance**: ``mean_bits(mean_batch(u)^2)``; every bit splits the data, so no bit is constant.
- **decorrelation**: mean squared off-diagonal of ``u^T u / B``; bits carry different information,
  so codes spread out within a class and the Hamming order inside a class can follow appearance.
- **ratings** (needs the readers' characteristics): cross-entropy of an auxiliary head on ``fc``
  predicting each reader rating's level (:mod:`~nodule_pipeline.hashing.characteristics`), so
  the model can say how readers would describe a query, and ``fc`` learns what they look at.
- **graded pairwise**: the pairwise likelihood with ``s`` the graded similarity of two nodules
  (same label times one minus their rating distance, the report's graded gain) instead of 0/1,
  so that alike-described nodules get closer codes than merely same-label ones.

Pure torch; the weights are fields of :class:`~nodule_pipeline.hashing.training.TrainConfig`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

from nodule_pipeline.hashing.characteristics import rating_loss, rating_similarity

PAIRWISE_SPAN = 32.0
"""Largest |theta| of the pairwise likelihood for codes of any length (all bits agreeing)."""


class ObjectiveWeights(NamedTuple):
    """The weight of each term; 0 leaves it out (cross-entropy alone is the paper's objective)."""

    cross_entropy: float = 1.0
    pairwise: float = 0.0
    quantization: float = 0.0
    balance: float = 0.0
    decorrelation: float = 0.0
    ratings: float = 0.0
    graded_pairwise: bool = False


def pairwise_likelihood_loss(theta: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Mean of ``log(1 + e^theta) - s theta`` over the pairs (softplus: stable for any theta)."""
    return (F.softplus(theta) - same * theta).mean()


def pairwise_term(
    u: torch.Tensor, labels: torch.Tensor, ratings: torch.Tensor | None = None, span: float = PAIRWISE_SPAN
) -> torch.Tensor:
    """DPSH's negative log-likelihood over the batch's distinct pairs of "same label or not", or,
    given encoded ``ratings``, of their graded similarity."""
    theta = (span / u.shape[1]) * (u @ u.T)
    same = (labels[:, None] == labels[None, :]).to(u.dtype)
    if ratings is not None:
        same = rating_similarity(ratings.to(u.dtype), same)
    off_diagonal = ~torch.eye(len(u), dtype=torch.bool, device=u.device)
    return pairwise_likelihood_loss(theta[off_diagonal], same[off_diagonal])


def quantization_term(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() - 1).pow(2).mean()


def balance_term(u: torch.Tensor) -> torch.Tensor:
    return u.mean(dim=0).pow(2).mean()


def decorrelation_term(u: torch.Tensor) -> torch.Tensor:
    bits = u.shape[1]
    correlation = (u.T @ u) / len(u)
    off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
    return off_diagonal.pow(2).sum() / (bits * (bits - 1))


def hashing_objective(
    logits: torch.Tensor,
    hash_probs: torch.Tensor,
    labels: torch.Tensor,
    weights: ObjectiveWeights,
    class_weight: torch.Tensor | None = None,
    rating_logits: torch.Tensor | None = None,
    ratings: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of the terms and the cross-entropy alone (what training curves show, so
    that they compare with the validation loss whatever the other weights). The rating terms
    need the batch's encoded reader ``ratings`` (and the rating head's ``rating_logits``);
    without them they are left out."""
    cross_entropy = F.cross_entropy(logits.float(), labels, weight=class_weight)
    total = weights.cross_entropy * cross_entropy
    u = 2 * hash_probs.float() - 1
    terms = (
        (weights.pairwise, lambda: pairwise_term(u, labels, ratings if weights.graded_pairwise else None)),
        (weights.quantization, lambda: quantization_term(u)),
        (weights.balance, lambda: balance_term(u)),
        (weights.decorrelation, lambda: decorrelation_term(u)),
    )
    if rating_logits is not None and ratings is not None:
        terms += ((weights.ratings, lambda: rating_loss(rating_logits, ratings)),)
    for weight, term in terms:
        if weight:
            total = total + weight * term()
    return total, cross_entropy
