"""Distillation losses against hand-computed values and the METHOD.md reference formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdseg.losses import (
    PairwiseLoss,
    PixelwiseLoss,
    attention_map,
    pairwise_loss,
    pairwise_nodes,
    pixelwise_loss,
)


def _reference_pairwise(feat_s: torch.Tensor, feat_t: torch.Tensor, scale: float) -> float:
    """METHOD.md's pa formula written out literally, with python loops over nodes, in float64."""

    def nodes(feat: torch.Tensor, b: int) -> list[torch.Tensor]:
        _, _, h, w = feat.shape
        kh, kw = int(h * scale), int(w * scale)
        out = []
        for i in range(0, h, kh):
            for j in range(0, w, kw):
                vec = feat[b, :, i : i + kh, j : j + kw].amax(dim=(1, 2)).double()
                out.append(vec / (math.sqrt(float((vec**2).sum())) + 1e-8))
        return out

    total = 0.0
    batch = feat_s.shape[0]
    for b in range(batch):
        ns, nt = nodes(feat_s, b), nodes(feat_t, b)
        n = len(ns)
        for i in range(n):
            for j in range(n):
                a_t = float(nt[i] @ nt[j])
                a_s = float(ns[i] @ ns[j])
                total += (a_t - a_s) ** 2 / n**2 / batch
    return total


def _nodes_map(vectors: list[tuple[float, float]]) -> torch.Tensor:
    """1 x 2 x 2 x 2 map whose 2x2 grid holds the given channel vectors in row-major order."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 2, 2, 2)


# ----------------------------------------------------------------------------- pair-wise


def test_pairwise_hand_computed():
    # Kernel floor(2 * 0.5) = 1: every pixel is a node, N = 4.
    # Student nodes (1,0), (0,1), (3,4), (0,2) normalise to (1,0), (0,1), (.6,.8), (0,1).
    # A_S = [[1,0,.6,0],[0,1,.8,1],[.6,.8,1,.8],[0,1,.8,1]]; teacher: all (1,0) -> A_T = ones.
    # Squared differences per row: 2.16, 1.04, 0.24, 1.04 -> 4.48; / N^2 = 16 -> 0.28.
    feat_s = _nodes_map([(1, 0), (0, 1), (3, 4), (0, 2)])
    feat_t = _nodes_map([(1, 0), (1, 0), (1, 0), (1, 0)])
    loss = pairwise_loss(feat_s, feat_t, scale=0.5)
    assert loss.item() == pytest.approx(0.28, rel=1e-6)


def test_pairwise_divides_by_batch():
    feat_s = _nodes_map([(1, 0), (0, 1), (3, 4), (0, 2)])
    feat_t = _nodes_map([(1, 0), (1, 0), (1, 0), (1, 0)])
    # Second image identical for teacher and student: contributes 0, the mean halves.
    loss = pairwise_loss(torch.cat([feat_s, feat_t]), torch.cat([feat_t, feat_t]))
    assert loss.item() == pytest.approx(0.14, rel=1e-6)


@pytest.mark.parametrize(
    ("size", "grid"), [((33, 33), (3, 3)), ((32, 32), (2, 2)), ((16, 16), (2, 2)), ((33, 16), (3, 2))]
)
def test_pairwise_grid_sizes(size, grid):
    assert pairwise_nodes(*size, scale=0.5) == grid
    h, w = size
    kernel = (h // 2, w // 2)
    pooled = F.max_pool2d(torch.zeros(1, 1, h, w), kernel, kernel, padding=0, ceil_mode=True)
    assert tuple(pooled.shape[2:]) == grid


def test_pairwise_norm_is_detached_in_backward():
    torch.manual_seed(0)
    feat_s = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    feat_t = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    pairwise_loss(feat_s, feat_t).backward()

    def loss_with(norm_fn):
        s = F.max_pool2d(feat_s, 3, 3, ceil_mode=True)
        t = F.max_pool2d(feat_t, 3, 3, ceil_mode=True)
        s = (s / norm_fn(s)).flatten(2)
        t = (t / (t.norm(dim=1, keepdim=True) + 1e-8)).flatten(2)
        a_s, a_t = s.transpose(1, 2) @ s, t.transpose(1, 2) @ t
        return ((a_t - a_s) ** 2).sum() / 4**2 / 2

    (grad_const_norm,) = torch.autograd.grad(
        loss_with(lambda s: s.detach().norm(dim=1, keepdim=True) + 1e-8), feat_s
    )
    (grad_live_norm,) = torch.autograd.grad(loss_with(lambda s: s.norm(dim=1, keepdim=True) + 1e-8), feat_s)
    torch.testing.assert_close(feat_s.grad, grad_const_norm)
    assert not torch.allclose(grad_const_norm, grad_live_norm, atol=1e-6)


def test_pairwise_teacher_gets_no_gradient():
    feat_s = torch.randn(1, 3, 4, 4, requires_grad=True)
    feat_t = torch.randn(1, 3, 4, 4, requires_grad=True)
    pairwise_loss(feat_s, feat_t).backward()
    assert feat_t.grad is None
    assert feat_s.grad is not None


def test_pairwise_zero_for_identical_inputs():
    feat = torch.randn(2, 8, 33, 33)
    assert pairwise_loss(feat, feat.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_pairwise_too_small_map_is_a_clear_error():
    feat = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match=r"feature map 1x1 is too small .*pa_scale=0.5"):
        pairwise_loss(feat, feat)


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5])
def test_pairwise_invalid_scale(scale):
    feat = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="pa_scale"):
        pairwise_loss(feat, feat, scale=scale)


def test_pairwise_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(1, 4, 8, 8\).*\(1, 4, 9, 8\)"):
        pairwise_loss(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 9, 8))
    with pytest.raises(ValueError, match="B x C x H x W"):
        pairwise_loss(torch.randn(4, 8, 8), torch.randn(4, 8, 8))


def test_pairwise_accepts_different_channel_counts():
    torch.manual_seed(1)
    feat_s, feat_t = torch.randn(2, 3, 9, 9), torch.randn(2, 7, 9, 9)
    assert pairwise_loss(feat_s, feat_t).item() == pytest.approx(_reference_pairwise(feat_s, feat_t, 0.5), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pairwise_float32_result_for_half_inputs(dtype):
    torch.manual_seed(2)
    feat_s, feat_t = torch.randn(2, 4, 8, 8, dtype=dtype), torch.randn(2, 4, 8, 8, dtype=dtype)
    loss = pairwise_loss(feat_s, feat_t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(pairwise_loss(feat_s.float(), feat_t.float()).item(), rel=1e-6)


def test_pairwise_float32_under_autocast():
    torch.manual_seed(3)
    feat_s, feat_t = torch.randn(2, 16, 9, 9), torch.randn(2, 16, 9, 9)
    expected = pairwise_loss(feat_s, feat_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pairwise_loss(feat_s, feat_t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_pairwise_matches_literal_reference_on_33x33():
    torch.manual_seed(4)
    feat_s, feat_t = torch.randn(2, 16, 33, 33), torch.randn(2, 16, 33, 33)
    assert pairwise_loss(feat_s, feat_t).item() == pytest.approx(_reference_pairwise(feat_s, feat_t, 0.5), rel=1e-5)


# ----------------------------------------------------------------------------- pixel-wise

# Student, C = 2: x^2 is [[1,0],[0,4]] in both channels -> a_S = [[1,0],[0,4]].
_PI_STUDENT = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 0.0], [0.0, -2.0]]]])
# Teacher, C = 3 (channel counts may differ): all ones -> a_T = [[1,1],[1,1]].
_PI_TEACHER = torch.ones(1, 3, 2, 2)


def test_pixelwise_hand_computed_height():
    # Height normalisation, per column: a_S columns (1,0) and (0,4) -> [[1,0],[0,1]];
    # a_T columns (1,1) -> all r = 1/sqrt(2).
    # Squared errors: (1-r)^2 twice and r^2 twice -> mean = (2(1.5 - sqrt2) + 1) / 4 = 1 - sqrt(2)/2.
    loss = pixelwise_loss(_PI_STUDENT, _PI_TEACHER, normalize="height")
    assert loss.item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_pixelwise_hand_computed_spatial():
    # Spatial: s = (1,0,0,4)/sqrt(17), t = (1,1,1,1)/2, both unit vectors;
    # sum (t-s)^2 = 2 - 2 t.s = 2 - 5/sqrt(17), mean over the 4 pixels.
    loss = pixelwise_loss(_PI_STUDENT, _PI_TEACHER, normalize="spatial")
    assert loss.item() == pytest.approx((2 - 5 / math.sqrt(17)) / 4, rel=1e-6)


def test_pixelwise_height_equals_spatial_for_single_column():
    torch.manual_seed(5)
    feat_s, feat_t = torch.randn(2, 4, 7, 1), torch.randn(2, 4, 7, 1)
    torch.testing.assert_close(
        pixelwise_loss(feat_s, feat_t, normalize="height"), pixelwise_loss(feat_s, feat_t, normalize="spatial")
    )


def test_attention_map_height_has_unit_columns():
    torch.manual_seed(6)
    att = attention_map(torch.randn(3, 5, 6, 7), normalize="height")
    assert att.shape == (3, 6, 7)
    torch.testing.assert_close(att.norm(dim=1), torch.ones(3, 7))


def test_attention_map_spatial_has_unit_images():
    torch.manual_seed(7)
    att = attention_map(torch.randn(3, 5, 6, 7), normalize="spatial")
    torch.testing.assert_close(att.flatten(1).norm(dim=1), torch.ones(3))


def test_pixelwise_zero_for_identical_inputs():
    feat = torch.randn(2, 8, 17, 17)
    assert pixelwise_loss(feat, feat.clone()).item() == 0.0


def test_pixelwise_resizes_student_to_teacher():
    torch.manual_seed(8)
    feat_s, feat_t = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 9, 9)
    resized = F.interpolate(feat_s, size=(9, 9), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pixelwise_loss(feat_s, feat_t), pixelwise_loss(resized, feat_t))


def test_pixelwise_invalid_mode():
    with pytest.raises(ValueError, match="height, spatial"):
        pixelwise_loss(_PI_STUDENT, _PI_TEACHER, normalize="channel")


def test_pixelwise_batch_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 5\).*\(3, 4, 5, 5\)"):
        pixelwise_loss(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 5, 5))


@pytest.mark.parametrize("normalize", ["height", "spatial"])
def test_pixelwise_gradcheck(normalize):
    torch.manual_seed(9)
    feat_s = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    feat_t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: pixelwise_loss(s, feat_t, normalize), (feat_s,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pixelwise_float32_result_for_half_inputs(dtype):
    feat_s, feat_t = torch.randn(2, 4, 8, 8, dtype=dtype), torch.randn(2, 4, 8, 8, dtype=dtype)
    assert pixelwise_loss(feat_s, feat_t).dtype == torch.float32


# ----------------------------------------------------------------------------- modules


def test_modules_apply_weight_and_keep_config():
    torch.manual_seed(10)
    feat_s, feat_t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    pa = PairwiseLoss(weight=3.0, scale=0.5)
    pi = PixelwiseLoss(weight=100.0, normalize="spatial")
    torch.testing.assert_close(pa(feat_s, feat_t), 3.0 * pairwise_loss(feat_s, feat_t))
    torch.testing.assert_close(pi(feat_s, feat_t), 100.0 * pixelwise_loss(feat_s, feat_t, "spatial"))
    assert (pa.name, pa.tap, pa.scale) == ("pa", "decoder.aspp.0.project.1", 0.5)
    assert (pi.name, pi.tap, pi.normalize) == ("pi", "decoder.block2.1", "spatial")


def test_modules_weight_zero_gives_zero():
    feat_s, feat_t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert PairwiseLoss(weight=0.0)(feat_s, feat_t).item() == 0.0
    assert PixelwiseLoss(weight=0.0)(feat_s, feat_t).item() == 0.0


@pytest.mark.parametrize("cls", [PairwiseLoss, PixelwiseLoss])
def test_modules_negative_weight_raises(cls):
    with pytest.raises(ValueError, match="weight"):
        cls(weight=-1.0)


def test_modules_validate_options_at_construction():
    with pytest.raises(ValueError, match="pa_scale"):
        PairwiseLoss(weight=1.0, scale=2.0)
    with pytest.raises(ValueError, match="height, spatial"):
        PixelwiseLoss(weight=1.0, normalize="width")
