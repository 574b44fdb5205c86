"""Batches without a labelled pixel: every term that averages over labelled pixels gives 0 with
zero gradient (not NaN), and the void-safe helpers of kdseg.losses.base leave labelled batches alone."""
from __future__ import annotations

import pytest
import torch

from kdseg.losses import IFVDLoss, KDLoss
from kdseg.losses.base import labelled, masked_mean, void_safe


def _feats(seed: int, shape=(2, 5, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(True), torch.randn(*shape, generator=g)


def test_labelled_is_false_only_when_every_pixel_is_void():
    masks = torch.full((2, 4, 4), 255)
    assert not labelled(masks)
    masks[1, 3, 3] = 0
    assert labelled(masks)
    assert not labelled(torch.full((1, 2, 2), 7), ignore_index=7)


def test_masked_mean_is_the_mean_of_the_valid_entries_and_zero_without_any():
    values = torch.tensor([1.0, 2.0, float("nan"), 6.0], requires_grad=True)
    valid = torch.tensor([True, False, False, True])
    out = masked_mean(values, valid)
    out.backward()
    assert out.item() == 3.5  # (1 + 6) / 2; the NaN at an invalid entry does not leak
    assert values.grad.tolist() == [0.5, 0.0, 0.0, 0.5]
    values.grad = None
    empty = masked_mean(values, torch.zeros(4, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and values.grad.tolist() == [0.0] * 4


def test_void_safe_passes_a_labelled_loss_through_bit_for_bit():
    x = torch.randn(3, requires_grad=True)
    loss = (x.exp() * 1.7).mean()
    safe = void_safe(loss, torch.tensor(True))
    (grad_safe,) = torch.autograd.grad(safe, x, retain_graph=True)
    (grad_plain,) = torch.autograd.grad(loss, x)
    assert torch.equal(safe, loss) and torch.equal(grad_safe, grad_plain)


@pytest.mark.parametrize("term", [KDLoss(1.0, temperature=4.0), IFVDLoss(1.0, num_classes=5, tap="x")], ids=["kd", "ifvd"])
def test_masked_terms_are_zero_with_zero_gradient_on_an_all_void_batch(term):
    feat_s, feat_t = _feats(0)
    loss = term(feat_s, feat_t, torch.full((2, 8, 8), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(feat_s.grad).all() and not feat_s.grad.any()
