"""The segmentation-KD baselines (kd, cwd, at, fitnet, dist, ifvd, pa's absolute kernel).

Each term is checked against a hand-computed small case and against an independent formula
written here (the reference code's form, float64, random tensors), value and gradient.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdseg.errors import ConfigError
from kdseg.losses import (
    ATLoss,
    CWDLoss,
    DISTLoss,
    FitNetLoss,
    IFVDLoss,
    KDLoss,
    PairwiseLoss,
    at_loss,
    cwd_loss,
    dist_loss,
    fitnet_loss,
    ifvd_loss,
    kd_loss,
    pairwise_loss,
    pairwise_nodes,
)

KL_HAND = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
"""KL((.75, .25) || (.5, .5)): the teacher's softened distribution against a uniform student."""


def _rand(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _same_grad(ours, reference, *inputs: torch.Tensor) -> None:
    """Value and gradient (w.r.t. the first input) of two formulas agree."""
    a, b = ours(*inputs), reference(*inputs)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    (ga,) = torch.autograd.grad(a, inputs[0])
    (gb,) = torch.autograd.grad(b, inputs[0])
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-12)


# ----------------------------------------------------------------------------- kd


def _cirkd_kd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """CIRKD losses/kd.py: rows are pixels, batchmean KL, times T^2."""
    c = s.shape[1]
    p_s = F.log_softmax(s.permute(0, 2, 3, 1).reshape(-1, c) / temperature, dim=1)
    p_t = F.softmax(t.permute(0, 2, 3, 1).reshape(-1, c) / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * temperature**2


def test_kd_hand_computed():
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    assert kd_loss(s, t).item() == pytest.approx(KL_HAND, rel=1e-6)


def test_kd_temperature_softens_and_rescales_by_t_squared():
    # at T = 2 the teacher logits (2 ln 3, 0) soften to (.75, .25): the KL above, times T^2 = 4
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([2 * math.log(3.0), 0.0]).view(1, 2, 1, 1)
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(4 * KL_HAND, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_cirkd_value_and_gradient(temperature):
    s, t = _rand(2, 5, 3, 4, seed=0, grad=True), _rand(2, 5, 3, 4, seed=1)
    _same_grad(lambda a, b: kd_loss(a, b, temperature), lambda a, b: _cirkd_kd(a, b, temperature), s, t)


def test_kd_gradcheck():
    s, t = _rand(1, 3, 2, 3, seed=2, grad=True), _rand(1, 3, 2, 3, seed=3)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, t, 2.0), (s,))


def test_kd_module_leaves_out_void_pixels():
    s, t = _rand(2, 4, 5, 5, seed=4), _rand(2, 4, 5, 5, seed=5)
    masks = torch.randint(0, 4, (2, 5, 5), generator=torch.Generator().manual_seed(6))
    masks[0, :2] = 255
    masks[1, :, 3:] = 255
    valid = masks != 255
    # the mean over labelled pixels only: the reference formula on those pixels alone
    rows_s = s.permute(0, 2, 3, 1)[valid][:, :, None, None]
    rows_t = t.permute(0, 2, 3, 1)[valid][:, :, None, None]
    expected = _cirkd_kd(rows_s, rows_t, 1.0)
    term = KDLoss(weight=2.0)
    torch.testing.assert_close(term(s, t, masks), 2.0 * expected)
    # what the logits do at void pixels does not matter
    changed = s.clone()
    changed.permute(0, 2, 3, 1)[~valid] = 100.0
    torch.testing.assert_close(term(changed, t, masks), term(s, t, masks))
    # no labelled pixel at all: 0, not NaN
    assert term(s, t, torch.full_like(masks, 255)).item() == 0.0


# ----------------------------------------------------------------------------- cwd


def _cirkd_cwd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """CIRKD losses/cwd.py with norm_type='channel', divergence='kl'."""
    n, c, h, w = s.shape
    norm_s = (s / temperature).reshape(n, c, -1).softmax(dim=-1).log()
    norm_t = (t / temperature).reshape(n, c, -1).softmax(dim=-1)
    return nn.KLDivLoss(reduction="sum")(norm_s, norm_t) / (n * c) * temperature**2


def test_cwd_hand_computed():
    # one channel over two locations: student uniform, teacher (4 ln 3, 0) / T=4 -> (.75, .25)
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([4 * math.log(3.0), 0.0]).view(1, 1, 1, 2)
    assert cwd_loss(s, t, temperature=4.0).item() == pytest.approx(16 * KL_HAND, rel=1e-6)
    # two images x two channels of that pair, with one channel agreeing: the sum over channels / (N * C)
    s2, t2 = torch.zeros(2, 2, 1, 2), torch.cat([t, torch.zeros(1, 1, 1, 2)], 1).repeat(2, 1, 1, 1)
    assert cwd_loss(s2, t2, temperature=4.0).item() == pytest.approx(16 * KL_HAND * 2 / 4, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cwd_matches_cirkd_value_and_gradient(temperature):
    s, t = _rand(2, 3, 4, 5, seed=7, grad=True), _rand(2, 3, 4, 5, seed=8)
    _same_grad(lambda a, b: cwd_loss(a, b, temperature), lambda a, b: _cirkd_cwd(a, b, temperature), s, t)


def test_cwd_gradcheck_and_module_weight():
    s, t = _rand(1, 2, 2, 3, seed=9, grad=True), _rand(1, 2, 2, 3, seed=10)
    assert torch.autograd.gradcheck(lambda a: cwd_loss(a, t, 4.0), (s,))
    torch.testing.assert_close(CWDLoss(weight=3.0)(s, t), 3.0 * cwd_loss(s, t, 4.0))


def test_cwd_needs_one_shape():
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4\).*\(1, 5, 4, 4\)"):
        cwd_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, 4, 4))


# ----------------------------------------------------------------------------- at


def _cirkd_at(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CIRKD losses/at.py."""
    def at(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    return (at(s) - at(t)).pow(2).mean()


def test_at_hand_computed():
    # student attention (1, 0, 0, 0), teacher (.5, .5, .5, .5) after normalising:
    # squared differences .25 + 3 x .25 -> mean over 4 pixels = .25
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    t = torch.ones(1, 3, 2, 2)
    assert at_loss(s, t).item() == pytest.approx(0.25, rel=1e-6)


def test_at_matches_cirkd_value_and_gradient():
    s, t = _rand(2, 4, 5, 6, seed=11, grad=True), _rand(2, 7, 5, 6, seed=12)
    _same_grad(at_loss, _cirkd_at, s, t)
    assert torch.autograd.gradcheck(lambda a: at_loss(a, t.detach()), (s,))
    torch.testing.assert_close(ATLoss(weight=10.0)(s, t), 10.0 * _cirkd_at(s, t))


# ----------------------------------------------------------------------------- fitnet


def test_fitnet_hand_computed_and_same_channels_need_no_adapter():
    assert fitnet_loss(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)).item() == 2.5
    term = FitNetLoss(weight=1.0)
    term.setup((2, 8, 4, 4), (2, 8, 4, 4))
    assert isinstance(term.adapter, nn.Identity) and not list(term.parameters())
    s, t = _rand(2, 8, 4, 4, seed=13, grad=True), _rand(2, 8, 4, 4, seed=14)
    _same_grad(lambda a, b: term(a, b), lambda a, b: F.mse_loss(a, b), s, t)


def test_fitnet_adapter_maps_student_channels_to_teacher_channels():
    torch.manual_seed(0)
    term = FitNetLoss(weight=2.0).double()
    term.setup((2, 3, 4, 4), (2, 5, 4, 4))
    term.double()
    conv, bn = term.adapter
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (3, 5, (1, 1), None)
    assert bn.num_features == 5
    s, t = _rand(2, 3, 4, 4, seed=15, grad=True), _rand(2, 5, 4, 4, seed=16)
    # independent: the 1x1 conv as a matrix product, BN in train mode from the batch's statistics
    z = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], s)
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    expected = 2.0 * ((z - t) ** 2).mean()
    loss = term(s, t)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 and s.grad is not None


def test_fitnet_without_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup"):
        FitNetLoss(weight=1.0)(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))


# ----------------------------------------------------------------------------- dist


def _numpy_dist(s: torch.Tensor, t: torch.Tensor, beta: float, gamma: float, temperature: float) -> float:
    """DIST with numpy's Pearson correlation: rows are pixels, columns classes."""
    c = s.shape[1]
    y_s = torch.softmax(s / temperature, 1).permute(0, 2, 3, 1).reshape(-1, c).detach().numpy()
    y_t = torch.softmax(t / temperature, 1).permute(0, 2, 3, 1).reshape(-1, c).detach().numpy()
    inter = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s, y_t)])
    intra = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(y_s.T, y_t.T)])
    return temperature**2 * (beta * (1 - inter) + gamma * (1 - intra))


@pytest.mark.parametrize("beta, gamma, temperature", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_numpy_pearson(beta, gamma, temperature):
    s, t = _rand(2, 4, 3, 3, seed=17), _rand(2, 4, 3, 3, seed=18)
    assert dist_loss(s, t, beta, gamma, temperature).item() == pytest.approx(_numpy_dist(s, t, beta, gamma, temperature), rel=1e-6)


def test_dist_hand_computed():
    # two pixels, three classes. Teacher = student: every correlation is 1, the loss 0.
    s = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 2)
    assert dist_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # teacher pixels swapped: the per-class (intra) relation of 2 pixels flips sign -> 1 - (-1) = 2 for each
    # class whose two values differ; the per-pixel (inter) relations are corr(p0, p1) and its mirror
    t = s.flip(-1)
    p = torch.softmax(s, 1)[0, :, 0, :].T.numpy()  # pixel x class
    inter = 1 - np.corrcoef(p[0], p[1])[0, 1]
    assert dist_loss(s, t).item() == pytest.approx(inter + 2.0, rel=1e-6)


def test_dist_gradcheck_and_module():
    s, t = _rand(1, 3, 2, 2, seed=19, grad=True), _rand(1, 3, 2, 2, seed=20)
    assert torch.autograd.gradcheck(lambda a: dist_loss(a, t), (s,))
    torch.testing.assert_close(DISTLoss(weight=2.0, beta=1.0, gamma=0.0)(s, t), 2.0 * dist_loss(s, t, 1.0, 0.0))


# ----------------------------------------------------------------------------- ifvd


def _cirkd_ifvd(feat_s: torch.Tensor, feat_t: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CIRKD losses/ifvd.py, literally."""
    size_f = (feat_s.shape[2], feat_s.shape[3])
    tar_s = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_s.size())
    tar_t = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_t.size())
    center_s, center_t = feat_s.clone(), feat_t.clone()
    for i in range(num_classes):
        m_s = (tar_s == i).to(feat_s.dtype)
        m_t = (tar_t == i).to(feat_t.dtype)
        center_s = (1 - m_s) * center_s + m_s * ((m_s * feat_s).sum(-1).sum(-1) / (m_s.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
        center_t = (1 - m_t) * center_t + m_t * ((m_t * feat_t).sum(-1).sum(-1) / (m_t.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
    cos = nn.CosineSimilarity(dim=1)
    return nn.MSELoss()(cos(feat_s, center_s), cos(feat_t, center_t))


def test_ifvd_hand_computed():
    # two pixels of class 0. Student features (1,0), (0,1): prototype (.5,.5), cosines 1/sqrt(2);
    # teacher (1,0), (1,0): prototype (1,0), cosines 1 -> (1 - 1/sqrt(2))^2 at both pixels.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    labels = torch.zeros(1, 1, 2, dtype=torch.long)
    assert ifvd_loss(s, t, labels, num_classes=2).item() == pytest.approx((1 - 1 / math.sqrt(2)) ** 2, rel=1e-6)
    # the same pixels labelled void are compared with themselves: similarity 1 for both, loss 0
    assert ifvd_loss(s, t, torch.full_like(labels, 255), num_classes=2).item() == pytest.approx(0.0, abs=1e-7)


def test_ifvd_matches_cirkd_value_and_gradient_with_void_and_downsampled_labels():
    s, t = _rand(2, 6, 4, 4, seed=21, grad=True), _rand(2, 9, 4, 4, seed=22)
    labels = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(23))
    labels[0, :3] = 255
    _same_grad(lambda a, b: ifvd_loss(a, b, labels, 5), lambda a, b: _cirkd_ifvd(a, b, labels, 5), s, t)
    assert torch.autograd.gradcheck(lambda a: ifvd_loss(a, t.detach(), labels, 5), (s,))
    term = IFVDLoss(weight=200.0, num_classes=5)
    torch.testing.assert_close(term(s, t, labels), 200.0 * _cirkd_ifvd(s, t, labels, 5))


def test_ifvd_needs_labels_and_a_class_count():
    with pytest.raises(ValueError, match="labels"):
        IFVDLoss(weight=1.0, num_classes=3)(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ConfigError, match="num_classes=0"):
        IFVDLoss(weight=1.0, num_classes=0)


# ----------------------------------------------------------------------------- pa with an absolute kernel


def test_pa_absolute_kernel_pools_k_by_k_windows():
    # 6x6 map, kernel 2 -> 3x3 nodes (a fraction 0.5 would pool 3x3 windows into 2x2 nodes)
    assert pairwise_nodes(6, 6, kernel=2) == (3, 3) and pairwise_nodes(6, 6, scale=0.5) == (2, 2)
    s, t = _rand(2, 4, 6, 6, seed=24), _rand(2, 4, 6, 6, seed=25)

    def literal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # CIRKD losses/skd.py, norm held constant
        def sim(f: torch.Tensor) -> torch.Tensor:
            f = F.max_pool2d(f, 2, 2, ceil_mode=True)
            f = (f / (f.norm(dim=1, keepdim=True) + 1e-8)).flatten(2)
            return f.transpose(1, 2) @ f

        return ((sim(a) - sim(b)) ** 2).mean()

    torch.testing.assert_close(pairwise_loss(s, t, kernel=2), literal(s, t))
    term = PairwiseLoss(weight=1.0, kernel=2)
    torch.testing.assert_close(term(s, t), literal(s, t))
    assert "kernel=2" in repr(term)


def test_pa_kernel_larger_than_the_map_and_bad_kernels_are_clear_errors():
    with pytest.raises(ValueError, match=r"feature map 2x2 is smaller than the pooling kernel=3"):
        pairwise_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), kernel=3)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="kernel"):
            PairwiseLoss(weight=1.0, kernel=bad)


# ----------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("cls", [KDLoss, CWDLoss, ATLoss, FitNetLoss, DISTLoss])
@pytest.mark.parametrize("weight", [-1.0, "high", float("nan")])
def test_bad_weight_is_a_config_error(cls, weight):
    with pytest.raises(ConfigError, match=r"weight=.*expected a number >= 0"):
        cls(weight=weight)


@pytest.mark.parametrize("cls", [KDLoss, CWDLoss, DISTLoss])
def test_bad_temperature_is_a_config_error(cls):
    with pytest.raises(ConfigError, match=r"temperature=0: expected a number > 0"):
        cls(weight=1.0, temperature=0)


def test_teacher_input_is_detached_unless_asked():
    s, t = _rand(1, 3, 2, 2, seed=26, grad=True), _rand(1, 3, 2, 2, seed=27, grad=True)
    KDLoss(weight=1.0)(s, t).backward()
    assert t.grad is None and s.grad is not None
    KDLoss(weight=1.0)(s, t, detach_teacher=False).backward()
    assert t.grad is not None
