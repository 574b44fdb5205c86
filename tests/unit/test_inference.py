"""Evaluation modes (kdseg.inference): whole image, sliding window, multi-scale + flip, and the eval config."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdseg.config import ConfigError, validate
from kdseg.inference import (
    EvalSettings,
    eval_settings,
    multiscale_flip_inference,
    predict,
    scaled_size,
    slide_inference,
    whole_inference,
    window_starts,
)
from kdseg.metrics import ConfusionMatrix
from kdseg.models import build_model
from kdseg.train import evaluate

from ..conftest import CONF_DIR


def pointwise(classes: int = 4, seed: int = 0) -> nn.Module:
    """A 1x1 conv: each output pixel depends on its own input pixel only (shift and flip equivariant)."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, classes, 1).eval()


@pytest.fixture(scope="module")
def deeplab() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", classes=3).eval()


class Probe(nn.Module):
    """Records each input's shape and top-left pixel; logits [0, height / 16] everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int]] = []
        self.corners: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[-2:]))
        self.corners.append((int(x[0, 0, 0, 0]), int(x[0, 1, 0, 0])))
        out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 1] = x.shape[-2] / 16
        return out


def coordinates(height: int, width: int) -> torch.Tensor:
    """A 1 x 3 x H x W image whose channels 0 / 1 hold each pixel's row / column."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack([rows, cols, torch.zeros(height, width)])[None]


# ------------------------------------------------------------------------------ windows


@pytest.mark.parametrize(
    "size, crop, stride, starts",
    [(5, 3, 2, [0, 2]), (6, 3, 2, [0, 2, 3]), (7, 3, 2, [0, 2, 4]), (4, 4, 2, [0]), (3, 5, 2, [0]),
     (64, 32, 16, [0, 16, 32]), (10, 4, 4, [0, 4, 6]), (100, 48, 32, [0, 32, 52])],
)
def test_window_starts_by_hand(size, crop, stride, starts):
    assert window_starts(size, crop, stride) == starts


def test_windows_cover_every_pixel_and_end_at_the_far_edge():
    for size, crop in [(s, c) for s in range(1, 40) for c in (3, 8, 16)]:
        for stride in range(1, crop + 1):
            starts = window_starts(size, crop, stride)
            covered = set().union(*(range(s, min(s + crop, size)) for s in starts))
            assert covered == set(range(size)), (size, crop, stride)
            assert starts == sorted(set(starts)) and starts[0] == 0
            assert starts[-1] == max(size - crop, 0)
            assert all(b - a == stride for a, b in zip(starts, starts[1:-1]))  # regular steps before the last
            assert len(starts) == 1 or 0 < starts[-1] - starts[-2] <= stride


# ------------------------------------------------------------------------------ sliding window


def test_slide_visits_the_windows_of_the_grid():
    probe = Probe()
    out = slide_inference(probe, coordinates(40, 56), crop=(16, 32), stride=(16, 16))
    assert set(probe.shapes) == {(16, 32)}
    assert probe.corners == [(y, x) for y in (0, 16, 24) for x in (0, 16, 24)]
    assert out.shape == (1, 2, 40, 56) and torch.all(out[:, 1] == 1.0)


@pytest.mark.parametrize("size", [(32, 48), (48, 32)])
def test_slide_with_one_image_sized_window_is_whole_image_eval_exactly(deeplab, size):
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert torch.equal(slide_inference(deeplab, images, crop=size, stride=16), deeplab(images))


@pytest.mark.parametrize("size, crop, stride", [((40, 56), 16, 8), ((48, 48), (32, 16), (16, 5)), ((64, 40), 32, 32)])
def test_slide_overlap_average_is_exact_for_a_pointwise_model(size, crop, stride):
    model, images = pointwise(), torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(model, images, crop, stride), model(images), rtol=1e-6, atol=1e-6)


def test_slide_pads_an_image_smaller_than_the_crop_and_crops_back():
    probe = Probe()
    out = slide_inference(probe, coordinates(20, 40), crop=32, stride=16)
    assert probe.shapes == [(32, 32), (32, 32)] and probe.corners == [(0, 0), (0, 8)]
    assert out.shape == (1, 2, 20, 40)
    model, images = pointwise(), torch.randn(1, 3, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(model, images, 32, 16), model(images), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("crop, stride, match", [(30, 10, "multiple of 16"), (0, 1, "multiple of 16"), (32, 0, "stride"),
                                                (32, 33, "stride"), ((32,), 16, "crop"), (32, (16, 16, 16), "stride")])
def test_slide_rejects_bad_windows(crop, stride, match):
    with pytest.raises(ValueError, match=match):
        slide_inference(pointwise(), torch.zeros(1, 3, 32, 32), crop, stride)


# ------------------------------------------------------------------------------ whole image, scales, flip


def test_whole_pads_to_a_multiple_of_16_and_crops_back():
    probe = Probe()
    assert whole_inference(probe, coordinates(20, 33)).shape == (1, 2, 20, 33)
    assert probe.shapes == [(32, 48)]
    model, images = pointwise(), torch.randn(1, 3, 20, 33)
    with torch.no_grad():
        assert torch.equal(whole_inference(model, images), model(images))


def test_one_view_is_the_model_output_bit_for_bit(deeplab):
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = deeplab(images)
        assert torch.equal(multiscale_flip_inference(deeplab, images, [1.0], False), expected)
        assert torch.equal(predict(deeplab, images, None), expected)
        assert torch.equal(predict(deeplab, images, {"mode": "whole", "scales": [1.0], "flip": False}), expected)


def test_scales_resize_to_rounded_sizes_padded_for_the_model():
    assert scaled_size(32, 50, 0.75) == (24, 38) and scaled_size(3, 3, 0.1) == (1, 1)
    probe = Probe()
    multiscale_flip_inference(probe, coordinates(32, 32), [0.5, 0.75, 1.25], flip=True)
    assert probe.shapes == [(16, 16)] * 2 + [(32, 32)] * 2 + [(48, 48)] * 2  # 24 -> 32 and 40 -> 48 padded


def test_views_are_averaged_as_probabilities():
    """Logits [0, t] with t = 1, 2, 3 at scales 0.5, 1, 1.5: p(class 1) = mean of sigmoid(t), not sigmoid(mean t)."""
    expected = sum(1 / (1 + math.exp(-t)) for t in (1, 2, 3)) / 3
    for flip in (False, True):
        probs = multiscale_flip_inference(Probe(), coordinates(32, 32), [0.5, 1.0, 1.5], flip).softmax(1)
        torch.testing.assert_close(probs[:, 1], torch.full((1, 32, 32), expected))
    assert abs(expected - 1 / (1 + math.exp(-2))) > 0.01


def test_flip_tta_is_flip_equivariant_for_any_model(deeplab):
    images = torch.randn(1, 3, 32, 48)
    flip_only = EvalSettings(flip=True)
    with torch.no_grad():
        assert torch.equal(predict(deeplab, images.flip(-1), flip_only), predict(deeplab, images, flip_only).flip(-1))
        ms_flip = EvalSettings(scales=(0.75, 1.25), flip=True)
        torch.testing.assert_close(predict(deeplab, images.flip(-1), ms_flip), predict(deeplab, images, ms_flip).flip(-1))


def test_flip_of_a_mirror_symmetric_input_with_a_flip_equivariant_model_is_plain_eval():
    half = torch.randn(1, 3, 16, 24)
    images = torch.cat([half, half.flip(-1)], dim=-1)
    model = pointwise()
    with torch.no_grad():
        plain = model(images)
        flipped = predict(model, images, EvalSettings(flip=True))
    torch.testing.assert_close(flipped, plain.log_softmax(1))
    assert torch.equal(flipped.argmax(1), plain.argmax(1))


def test_scales_and_flip_on_top_of_sliding_windows():
    probe = Probe()
    settings = eval_settings({"mode": "slide", "crop": 16, "stride": 8, "scales": [0.5, 1.0], "flip": True})
    out = predict(probe, coordinates(24, 32), settings)
    assert set(probe.shapes) == {(16, 16)} and len(probe.shapes) == 2 * (1 + 2 * 3)  # 12x16: 1 window, 24x32: 2 x 3
    assert out.shape == (1, 2, 24, 32)
    model = pointwise()
    images = torch.randn(1, 3, 1, 1).expand(1, 3, 24, 24).clone()  # constant: every view predicts the same
    with torch.no_grad():
        torch.testing.assert_close(predict(model, images, settings), model(images).log_softmax(1))


# ------------------------------------------------------------------------------ evaluate()


def manual_metrics(model: nn.Module, loader: DataLoader, num_classes: int, predict_fn) -> dict:
    matrix = ConfusionMatrix(num_classes)
    with torch.no_grad():
        for images, masks in loader:
            matrix.update(predict_fn(images).argmax(1), masks)
    return matrix.compute()


@pytest.fixture(scope="module")
def val_loader() -> DataLoader:
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 48)
    masks = torch.randint(0, 3, (4, 32, 48))
    masks[:, :4] = 255
    return DataLoader(TensorDataset(images, masks), batch_size=2)


def test_evaluate_default_is_the_plain_model_pass(deeplab, val_loader, make_cfg):
    today = manual_metrics(deeplab, val_loader, 3, deeplab)
    device = torch.device("cpu")
    assert evaluate(deeplab, val_loader, 3, device) == today
    assert evaluate(deeplab, val_loader, 3, device, eval_cfg=make_cfg().eval) == today
    whole_window = make_cfg("eval=slide", "eval.crop=[32,48]").eval
    assert evaluate(deeplab, val_loader, 3, device, eval_cfg=whole_window) == today


def test_evaluate_uses_the_eval_config(deeplab, val_loader, make_cfg):
    cfg_eval = make_cfg("eval=ms_flip", "eval.mode=slide", "eval.crop=16", "eval.stride=16", "eval.scales=[0.5,1.0]").eval
    expected = manual_metrics(deeplab, val_loader, 3, lambda images: predict(deeplab, images, cfg_eval))
    assert evaluate(deeplab, val_loader, 3, torch.device("cpu"), eval_cfg=cfg_eval) == expected


# ------------------------------------------------------------------------------ config


def test_eval_group_options(make_cfg):
    options = sorted(p.stem for p in (Path(CONF_DIR) / "eval").glob("*.yaml"))
    assert options == ["ms_flip", "slide", "whole"]
    for option in options:
        validate(make_cfg(f"eval={option}"))
    cfg = make_cfg()
    validate(cfg)
    assert eval_settings(cfg.eval) == EvalSettings(crop=(64, 64), stride=(42, 42))
    slide = make_cfg("eval=slide", "eval.crop=[32,48]")
    validate(slide)
    assert eval_settings(slide.eval) == EvalSettings("slide", (32, 48), (21, 32))
    ms = make_cfg("eval=ms_flip")
    validate(ms)
    settings = eval_settings(ms.eval)
    assert settings.mode == "whole" and settings.flip and settings.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    assert settings.describe() == "whole, scales 0.5, 0.75, 1, 1.25, 1.5, 1.75, flip"
    assert eval_settings(make_cfg("eval=slide", "eval.stride=[16,32]").eval).describe() == "slide 64x64 / 16x32"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.mode=tiles"], "eval.mode='tiles': expected one of whole, slide"),
        (["eval=slide", "eval.crop=30"], "eval.crop=30: expected a multiple of 16"),
        (["eval=slide", "eval.crop=[32]"], "eval.crop=[32]: expected an integer or [height, width]"),
        (["eval=slide", "eval.crop=null"], "eval.crop=None: expected the sliding window size"),
        (["eval=slide", "eval.stride=0"], "eval.stride=0: expected 0 < stride <= eval.crop (64)"),
        (["eval=slide", "eval.stride=80"], "eval.stride=80: expected 0 < stride <= eval.crop"),
        (["eval=slide", "eval.crop=[32,64]", "eval.stride=[16,65]"], "eval.stride=[16, 65]: expected 0 < stride"),
        (["eval.scales=[]"], "eval.scales=[]: expected a non-empty list of numbers > 0"),
        (["eval.scales=[1.0,-0.5]"], "eval.scales=[1.0, -0.5]: expected a non-empty list"),
        (["eval.scales=1.0"], "eval.scales=1.0: expected a non-empty list"),
        (["eval.flip=sometimes"], "eval.flip='sometimes': expected true or false"),
    ],
)
def test_bad_eval_keys_are_clear_errors(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match="config " + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        validate(make_cfg(*overrides))


# ------------------------------------------------------------------------------ through run.py's tasks


