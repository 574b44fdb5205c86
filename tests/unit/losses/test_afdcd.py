"""Af-DCD (afdcd): the omni-contrastive and mimicking parts against the authors' formulas written
here (float64, random tensors, value and gradient), a hand-computed case, the mask and its state."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdseg.errors import ConfigError
from kdseg.losses import AfDCDLoss, mimic_loss, omni_contrastive_loss
from kdseg.losses.afdcd import patch_tokens
from kdseg.losses.base import step_generator


def _rand(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _reference_tokens(x: torch.Tensor, patch: int, m: int) -> torch.Tensor:
    """OSVAI/Af-DCD losses/ocmgd.py ``_to_ctr_format``."""
    bs, c, h, w = x.shape
    num_p, n2 = (h * w) // (patch * patch), patch * patch
    x = x.contiguous().view(bs, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    x = torch.stack(x.split(c // m, dim=3), dim=3)
    x = x.contiguous().view(bs, num_p, m, c // m, n2)
    return x.permute(0, 1, 4, 2, 3).contiguous().view(-1, n2 * m, c // m)


def _reference_omni(preds: torch.Tensor, targets: torch.Tensor, tau: float, m: int, pool: int, patch: int) -> torch.Tensor:
    """``get_omni_contrastive_loss`` (non-CamVid branch) divided by the batch, as ``get_dis_loss`` does."""
    bs = preds.shape[0]
    if pool:
        preds, targets = F.max_pool2d(preds, pool), F.max_pool2d(targets, pool)
    _, _, h, w = preds.shape
    n2 = patch * patch
    preds, targets = _reference_tokens(preds, patch, m), _reference_tokens(targets, patch, m)
    sim = -torch.cdist(preds, targets, p=1)
    mask = torch.eye(n2 * m, dtype=torch.bool).repeat(sim.shape[0], 1, 1)
    mask_c = torch.cat([torch.arange(m) for _ in range(n2)], dim=0)
    mask_c = mask_c.unsqueeze(0) == mask_c.unsqueeze(1)
    mask_negative = ~mask_c.repeat(sim.shape[0], 1, 1)
    positives = sim[mask].view(bs * h * w * m, -1)
    negatives = sim[mask_negative].view(bs * h * w * m, -1)
    logits = torch.cat([positives, negatives], dim=1) / tau
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels, reduction="sum") / (h * w) / bs


def test_tokens_are_the_authors_layout():
    x = _rand(2, 8, 4, 8, seed=0)
    torch.testing.assert_close(patch_tokens(x, 2, 4), _reference_tokens(x, 2, 4), rtol=0, atol=0)


def test_omni_contrastive_hand_computed():
    # one pixel, two channel groups of one channel: student tokens (0, 0), teacher tokens (0, 1), tau = 1
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    # group 0: positive -|0 - 0| = 0, negative -|0 - 1| = -1; group 1: positive -1, negative 0
    expected = math.log(1 + math.exp(-1)) + (math.log(math.exp(-1) + 1) + 1)
    assert omni_contrastive_loss(s, t, 1.0, groups=2, pool_size=0, patch_size=1).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("pool, patch, groups", [(4, 4, 16), (2, 2, 4), (0, 1, 2)])
def test_omni_contrastive_matches_the_authors_value_and_gradient(pool, patch, groups):
    s, t = _rand(2, 32, 16, 8, seed=1, grad=True), _rand(2, 32, 16, 8, seed=2)
    if pool == 4:
        s, t = _rand(2, 32, 16, 16, seed=1, grad=True), _rand(2, 32, 16, 16, seed=2)
    ours, ref = omni_contrastive_loss(s, t, 0.07, groups, pool, patch), _reference_omni(s, t, 0.07, groups, pool, patch)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-7, atol=1e-10)


def test_mimic_is_the_sum_of_squares_over_the_batch():
    s, t = _rand(3, 4, 2, 2, seed=3), _rand(3, 4, 2, 2, seed=4)
    torch.testing.assert_close(mimic_loss(s, t), torch.nn.MSELoss(reduction="sum")(s, t) / 3)


def test_maps_that_cannot_be_cut_are_value_errors():
    with pytest.raises(ValueError, match="cannot be cut into 4 x 4 patches"):
        omni_contrastive_loss(torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8))  # pooled to 2 x 2
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        omni_contrastive_loss(torch.zeros(1, 16, 2, 2), torch.zeros(1, 16, 2, 2))


def _term(**kwargs) -> AfDCDLoss:
    term = AfDCDLoss(**{"weight": 2.0, "groups": 4, "pool_size": 2, "patch_size": 2, "seed": 5, **kwargs})
    term.setup((2, 6, 8, 8), (2, 8, 8, 8))
    return term.double()


def test_term_is_the_authors_sum_on_the_masked_projected_student():
    term = _term()
    s, t = _rand(2, 6, 8, 8, seed=6, grad=True), _rand(2, 8, 8, 8, seed=7)
    keep = term.keep_mask((2, 8, 8, 8), s.device).double()
    projected = term.projector(term.align(s) * keep)
    expected = 2.0 * (1e-6 * F.mse_loss(projected, t, reduction="sum") / 2 + 0.005 * _reference_omni(projected, t, 0.07, 4, 2, 2))
    ours = term(s, t, None)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(expected, s)[0], rtol=1e-7, atol=1e-12)
    # it reads no labels: an all-void batch gives the same finite value
    torch.testing.assert_close(term(s, t, torch.full((2, 8, 8), 255)), ours)


def test_mask_drops_about_mask_ratio_and_changes_with_the_step_only():
    term = _term()
    first = term.keep_mask((4, 1, 32, 32), torch.device("cpu"))
    draws = torch.rand(4, 1, 32, 32, generator=step_generator(5, 0))
    assert torch.equal(first.long(), torch.where(draws > 1 - 0.75, 0, 1))  # the code's rule, from the term's stream
    assert 1 - first.double().mean().item() == pytest.approx(0.75, abs=0.03)
    assert torch.equal(term.keep_mask((4, 1, 32, 32), torch.device("cpu")), first)  # the loss does not advance it
    term.update_state(None, None, None)
    assert term.step.item() == 1 and not torch.equal(term.keep_mask((4, 1, 32, 32), torch.device("cpu")), first)
    assert torch.equal(_term().keep_mask((4, 1, 32, 32), torch.device("cpu")), first)  # the same seed and step: the same mask


def test_setup_is_seeded_and_leaves_the_global_rng_alone():
    rng = torch.get_rng_state()
    a, b = _term(), _term()
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert isinstance(_term(groups=2).align, torch.nn.Conv2d)
    same = AfDCDLoss(1.0)
    same.setup((1, 8, 4, 4), (1, 8, 4, 4))
    assert isinstance(same.align, torch.nn.Identity)


@pytest.mark.parametrize("key, value", [("mask_ratio", 1.0), ("groups", 0), ("pool_size", -1), ("temperature", 0.0)])
def test_bad_options_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        AfDCDLoss(1.0, **{key: value})
