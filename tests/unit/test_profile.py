"""kdseg.profile: parameter count, FLOPs (torch's counter, checked against hand formulas), latency, mode restore."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdseg.errors import ConfigError
from kdseg.models import build_model
from kdseg import profile
from kdseg.profile import cached_model_stats, check_input_size, count_flops, measure_latency, model_stats, stable_latency, stats_metrics


class Recorder(nn.Module):
    """A 1x1 convolution that records, per forward call, its mode and whether inference mode was on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        return self.conv(x)


@pytest.fixture(scope="module")
def deeplab() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", classes=21)


def test_params_equal_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    hand = (3 * 4 * 3 * 3 + 4) + (4 + 4) + 4 * 2  # conv weight + bias, BN weight + bias, 1x1 conv
    stats = model_stats(model, (8, 8), repeats=1, warmup=0)
    assert stats["params_m"] == pytest.approx(hand / 1e6, rel=0, abs=1e-12)


@pytest.mark.parametrize("h, w", [(16, 24), (7, 5)])
def test_conv_flops_equal_the_hand_formula(h, w):
    cin, cout, k = 3, 8, 3
    conv = nn.Conv2d(cin, cout, k, padding=1)  # same-size output
    assert count_flops(conv, torch.randn(1, cin, h, w)) == 2 * cin * cout * k * k * h * w
    strided = nn.Conv2d(cin, cout, k, stride=2)  # output (h - k) // 2 + 1 per side
    ho, wo = (h - k) // 2 + 1, (w - k) // 2 + 1
    assert count_flops(strided, torch.randn(1, cin, h, w)) == 2 * cin * cout * k * k * ho * wo


def test_linear_flops_equal_the_hand_formula():
    c, h, w, out = 3, 5, 7, 11
    linear = nn.Linear(w, out)  # applied to the last axis of a (1, c, h, w) input: c*h rows
    stats = model_stats(linear, (h, w), repeats=1, warmup=0, channels=c)
    assert stats["gflops"] * 1e9 == pytest.approx(2 * c * h * w * out, rel=1e-12)


def test_deeplab_flops_are_positive_and_scale_with_the_pixels(deeplab):
    small = count_flops(deeplab.eval(), torch.randn(1, 3, 64, 64))
    large = count_flops(deeplab, torch.randn(1, 3, 128, 128))
    assert small > 0
    assert large / small == pytest.approx(4.0, rel=0.05)  # convolution-dominated: FLOPs ~ pixels


def test_latency_and_fps_are_consistent(deeplab):
    stats = model_stats(deeplab, (64, 64), repeats=2, warmup=1)
    assert stats["latency_ms"] > 0 and stats["fps"] > 0
    assert stats["fps"] * stats["latency_ms"] == pytest.approx(1000.0)
    assert stats["gflops"] > 0 and stats["params_m"] > 1


def test_passes_run_in_eval_and_inference_mode_and_are_counted():
    model = Recorder()
    model_stats(model, (4, 4), repeats=3, warmup=2)
    assert len(model.calls) == 1 + 2 + 3  # the FLOP count, warm-up, timed repeats
    assert model.calls == [(False, True)] * 6


@pytest.mark.parametrize("train", [True, False])
def test_model_mode_is_restored(deeplab, train):
    deeplab.train(train)
    deeplab.decoder.eval()  # a mixed state must come back exactly, module by module
    before = {name: m.training for name, m in deeplab.named_modules()}
    model_stats(deeplab, (32, 32), repeats=1, warmup=0)
    assert {name: m.training for name, m in deeplab.named_modules()} == before
    assert deeplab.training is train


def test_a_size_the_model_cannot_take_is_named_before_anything_runs(deeplab):
    calls = []
    handle = deeplab.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ConfigError, match=r"64x72 .* multiples of 16.*64x80"):
            model_stats(deeplab, (64, 72))
    finally:
        handle.remove()
    assert calls == []


def test_bad_sizes_and_repeats_are_config_errors(deeplab):
    with pytest.raises(ConfigError, match="positive, got 0x64"):
        check_input_size(deeplab, (0, 64))
    with pytest.raises(ConfigError, match=r"\(height, width\)"):
        check_input_size(deeplab, (64,))
    assert check_input_size(nn.Conv2d(3, 3, 1), (7, 9)) == (7, 9)  # plain modules take any size
    with pytest.raises(ConfigError, match="repeats must be >= 1"):
        measure_latency(nn.Identity(), torch.zeros(1), repeats=0)


def test_stats_metrics_names():
    stats = {"params_m": 12.3, "gflops": 0.57, "latency_ms": 4.0, "fps": 250.0}
    assert stats_metrics(stats, "student") == {
        "params/student_m": 12.3,
        "speed/student_gflops": 0.57,
        "speed/student_latency_ms": 4.0,
        "speed/student_fps": 250.0,
    }
    assert sorted(stats_metrics(stats, "teacher")) == [
        "params/teacher_m", "speed/teacher_fps", "speed/teacher_gflops", "speed/teacher_latency_ms",
    ]


@pytest.mark.parametrize("rounds, expected", [(1, (10.0, 1)), (2, (8.0, 2)), (5, (7.9, 3))])
def test_latency_is_the_minimum_of_rounds_until_a_round_no_longer_lowers_it(monkeypatch, rounds, expected):
    """Medians 10, 8, 7.9, 5 ms: 8 lowers the minimum by 20%, 7.9 by 1.25% (< 2%: stable), so 5 is never measured."""
    medians = iter([10.0, 8.0, 7.9, 5.0])
    warmups = []
    monkeypatch.setattr(profile, "measure_latency", lambda model, x, repeats, warmup: warmups.append(warmup) or next(medians))
    assert stable_latency(nn.Identity(), torch.zeros(1), repeats=4, warmup=2, rounds=rounds) == expected
    assert warmups == [2] + [0] * (expected[1] - 1)  # only the first round warms up


def test_speed_is_measured_once_per_model_size_and_device_and_read_back_unchanged(tmp_path, monkeypatch):
    calls = []
    measure = profile.measure_latency
    monkeypatch.setattr(profile, "measure_latency", lambda *args: calls.append(args[1].shape) or measure(*args))
    model, config = nn.Conv2d(3, 2, 1), {"encoder_name": "tiny", "classes": 2}
    first, path = cached_model_stats(model, config, (16, 16), "cpu", tmp_path, repeats=2, warmup=1, rounds=3)
    measured = len(calls)
    assert 1 <= measured <= 3 and path.is_file() and path.parent == tmp_path / "speed" and path.name.startswith("tiny-16x16-")
    again, same = cached_model_stats(model, config, (16, 16), "cpu", tmp_path, repeats=2, warmup=1, rounds=3)
    assert (again, same) == (first, path) and len(calls) == measured  # a hit: the same figures, nothing timed
    assert again["fps"] == pytest.approx(1000 / again["latency_ms"])
    for other in [(config | {"classes": 3}, (16, 16), 2), (config, (8, 16), 2), (config, (16, 16), 3)]:  # model, size, method
        before = len(calls)
        _, other_path = cached_model_stats(nn.Conv2d(3, other[0]["classes"], 1), other[0], other[1], "cpu", tmp_path,
                                           repeats=other[2], warmup=1, rounds=3)
        assert other_path != path and len(calls) > before, other
