"""The hashing terms of the training objective and the training augmentation, against their formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nodule_pipeline.hashing.augment import augment_batch, dihedral, random_dihedral, random_shift
from nodule_pipeline.hashing.objective import (
    PAIRWISE_SPAN,
    ObjectiveWeights,
    balance_term,
    decorrelation_term,
    hashing_objective,
    pairwise_likelihood_loss,
    pairwise_term,
    quantization_term,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def test_pairwise_likelihood_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    u = torch.from_numpy(rng.uniform(-1, 1, (5, 16)))
    labels = torch.tensor([0, 1, 1, 0, 1])
    theta = PAIRWISE_SPAN / 16 * u.numpy() @ u.numpy().T
    same = (labels.numpy()[:, None] == labels.numpy()[None, :]).astype(float)
    pairs = ~np.eye(5, dtype=bool)  # an item paired with itself says nothing
    expected = np.mean(np.log1p(np.exp(theta[pairs])) - same[pairs] * theta[pairs])
    assert float(pairwise_term(u, labels)) == pytest.approx(expected, rel=1e-10)
    # DPSH's own scaling, as its baseline calls it
    memory = torch.from_numpy(rng.standard_normal((6, 8)) * 3)
    v = torch.from_numpy(rng.standard_normal((4, 8)) * 3)
    s = torch.from_numpy((rng.random((4, 6)) < 0.5).astype(np.float64))
    t = 0.5 * v.numpy() @ memory.numpy().T
    want = np.mean(np.log1p(np.exp(t)) - s.numpy() * t)
    assert float(pairwise_likelihood_loss(0.5 * v @ memory.T, s)) == pytest.approx(want, rel=1e-10)


def test_pairwise_term_prefers_codes_that_agree_within_a_class() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    a, b = torch.ones(32), -torch.ones(32)
    by_class = torch.stack([a, a, b, b])
    mixed = torch.stack([a, b, a, b])
    assert pairwise_term(by_class, labels) < 1e-6 < 1.0 < pairwise_term(mixed, labels)


def test_quantization_is_zero_only_at_binary_codes() -> None:
    assert float(quantization_term(torch.tensor([[1.0, -1.0, 1.0]]))) == 0.0
    assert float(quantization_term(torch.tensor([[0.5, -1.0, 0.0]]))) == pytest.approx((0.25 + 0 + 1) / 3)


def test_balance_is_zero_when_every_bit_splits_the_batch() -> None:
    codes = torch.from_numpy(_hadamard(8)[:, 1:])  # every column but the first is half +1, half -1
    assert float(balance_term(codes)) == pytest.approx(0.0, abs=1e-12)
    constant = codes.clone()
    constant[:, 0] = 1.0  # one constant bit of 7
    assert float(balance_term(constant)) == pytest.approx(1 / 7)


def test_decorrelation_is_zero_for_independent_bits_and_one_for_copies() -> None:
    codes = torch.from_numpy(_hadamard(16)[:, :8])  # orthogonal columns
    assert float(decorrelation_term(codes)) == pytest.approx(0.0, abs=1e-12)
    copies = codes[:, :1].repeat(1, 8)  # every bit the same: every correlation is 1
    assert float(decorrelation_term(copies)) == pytest.approx(1.0)


def test_objective_weights_and_gradients() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 2, requires_grad=True)
    pre = torch.randn(6, 32, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    paper_total, paper_ce = hashing_objective(logits, torch.sigmoid(pre), labels, ObjectiveWeights())
    assert paper_total.item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert paper_ce.item() == pytest.approx(paper_total.item())
    paper_total.backward()
    assert pre.grad is None  # cross-entropy alone does not reach a hash layer the classifier does not read here
    weights = ObjectiveWeights(1.0, 2.0, 3.0, 4.0, 5.0)
    total, ce = hashing_objective(logits, torch.sigmoid(pre), labels, weights)
    u = 2 * torch.sigmoid(pre) - 1
    expected = ce + 2 * pairwise_term(u, labels) + 3 * quantization_term(u) + 4 * balance_term(u)
    expected = expected + 5 * decorrelation_term(u)
    assert total.item() == pytest.approx(expected.item())
    total.backward()
    assert pre.grad is not None and float(pre.grad.abs().sum()) > 0


def test_the_eight_symmetries_are_distinct_and_invertible() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = [dihedral(x, k) for k in range(8)]
    assert torch.equal(views[0], x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for k in range(4):  # a quarter turn k times undone by 4 - k more
        assert torch.equal(dihedral(dihedral(x, k), (4 - k) % 4), x)
    assert torch.equal(dihedral(dihedral(x, 4), 4), x)  # a flip undoes itself


def test_random_augmentation_keeps_values_and_is_seeded() -> None:
    x = torch.rand(64, 1, 32, 32)
    turned = random_dihedral(x, torch.Generator().manual_seed(1))
    for a, b in zip(x, turned):  # each ROI is one of its own symmetries
        assert any(torch.equal(dihedral(a, k), b) for k in range(8))
    shifted = random_shift(x, 2, torch.Generator().manual_seed(1))
    inner = shifted[:, :, 2:-2, 2:-2]
    found = [
        any(
            torch.equal(inner[i], x[i, :, 2 + dy : 30 + dy, 2 + dx : 30 + dx])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
        for i in range(64)
    ]
    assert all(found)  # whole-pixel moves, no resampling
    jittered = augment_batch(x, torch.Generator().manual_seed(3), symmetries=False, intensity_jitter=0.1)
    offsets = (jittered - x).flatten(1)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-6)  # one offset per ROI
    assert float(offsets[:, 0].std()) == pytest.approx(0.1, rel=0.3)
    again = augment_batch(x, torch.Generator().manual_seed(5), True, 2, 0.1)
    assert torch.equal(again, augment_batch(x, torch.Generator().manual_seed(5), True, 2, 0.1))
    assert torch.equal(augment_batch(x, torch.Generator(), False, 0, 0.0), x)
