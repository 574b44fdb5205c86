"""``python -m kdseg.bench`` at a tiny size, and the plumbing of the speed switches, checked on CPU.

Nothing here is timed: the numbers depend on the machine. The CUDA switches are checked
through what they set up (autocast dtype, GradScaler, memory format, cuDNN flags, pinned
loaders, compile) on CPU, where they can be checked on every machine.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from kdseg import bench
from kdseg.data import build_loaders
from kdseg.distill import Distiller
from kdseg.losses import PairwiseLoss, PixelwiseLoss, pairwise_loss, pixelwise_loss
from kdseg.metrics import ConfusionMatrix
from kdseg.models import build_model
from kdseg.runtime import amp_policy, auto_flag, configure_backends
from kdseg.train import Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = ["--teacher", "resnet18", "--student", "resnet18", "--crop", "64", "--batch", "2",
        "--iterations", "1", "--repeats", "1", "--warmup", "1", "--scaling-crops", "64", "--scaling-batches", "2"]


def _batch(b: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 21, (b, size, size), generator=g)
    masks[:, :2] = 255
    return torch.randn(b, 3, size, size, generator=g), masks


def _trainer(make_cfg, *overrides: str, terms: bool = False) -> Trainer:
    cfg = make_cfg(*overrides)
    torch.manual_seed(0)
    student = build_model("resnet18", classes=21)
    if terms:
        model = Distiller(student, build_model("resnet18", classes=21), {"pi": PixelwiseLoss(100), "pa": PairwiseLoss(1)})
    else:
        model = Distiller(student)
    return Trainer(model, [_batch()], None, cfg=cfg.trainer, epochs=1, num_classes=21, out_dir=".", model_config={}, device=CPU)


# ------------------------------------------------------------------ the benchmark itself

def test_bench_students_measures_a_fused_step_and_its_ratios(tmp_path, capsys):
    """``--students N``: N students train on one teacher pass per batch, and the ratios are the issue's formulas."""
    out = tmp_path / "fused.json"
    result = bench.main([*TINY[:4], "--crop", "64", "--batch", "2", "--iterations", "1", "--repeats", "1", "--warmup", "0",
                         "--students", "2", "--json", str(out), f"paths.data_dir={tmp_path}/data"])
    text = capsys.readouterr().out
    ms = result["fused"]["ms_per_batch"]
    assert set(ms) == {"teacher", "student", "distill", "fused"}
    assert math.isclose(result["fused"]["fused_overhead"], ms["fused"] / (2 * ms["student"] + ms["teacher"]))
    assert math.isclose(result["fused"]["fused_speedup"], 2 * ms["distill"] / ms["fused"])
    assert "fused step of 2 students (one teacher pass)" in text and "fused_overhead = " in text and "fused_speedup = " in text
    assert json.loads(out.read_text())["fused"]["students"] == 2


def test_a_fused_step_runs_the_teacher_once_per_batch_for_every_student(make_cfg):
    cfg = make_cfg("loss=pi_pa")
    trainers, next_batch = bench.build_fused(cfg, 3, CPU, ([_batch()], None))
    teacher = trainers[0].model.teacher
    assert all(t.model.teacher is teacher for t in trainers)  # one teacher in memory
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch()
    for _ in range(2):
        next_batch()
        losses = [t.train_step(*batch)[1] for t in trainers]
        assert all(set(parts) == {"ce", "pi", "pa"} for parts in losses)
    assert len(calls) == 2  # one pass per batch, not per student

@pytest.mark.slow  # ~30 s: a whole bench at tiny size
def test_bench_runs_at_tiny_size_and_prints_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main([*TINY, "--no-ablations", "--json", str(out), f"paths.data_dir={tmp_path}/data"])
    text = capsys.readouterr().out

    for label in bench.LABELS.values():
        assert label in text, label
    for figure in ("overhead =", "speedup_vs_reference =", "loader_headroom =", "memory_ratio =", "peak RSS (MiB)", "scaling"):
        assert figure in text, figure
    for name in ("teacher", "student", "distill", "reference", "loader", "eval"):
        assert result["img_s"][name] > 0 and math.isfinite(result["img_s"][name]), name
    for mode in bench.TRAIN_MODES:
        memory = result["memory_mib"][mode]
        assert memory["peak_mib"] > memory["above_baseline_mib"] > 0, mode
    assert set(result["ratios"]) == {"overhead", "speedup_vs_reference", "loader_headroom", "memory_ratio", "memory_ratio_absolute"}
    assert all(r > 0 and math.isfinite(r) for r in result["ratios"].values())
    (cell,) = result["scaling"]
    assert (cell["crop"], cell["batch"]) == (64, 2) and cell["overhead"] > 0 and cell["speedup_vs_reference"] > 0
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"])


@pytest.mark.slow
def test_bench_ablations_flip_each_switch(tmp_path, capsys):
    result = bench.main([*TINY, "--no-memory", "--scaling-crops", "", f"paths.data_dir={tmp_path}/data"])
    switches = {(a["what"], a["switch"]) for a in result["ablations"]}
    assert {("distillation step", "trainer.channels_last"), ("distillation step", "trainer.amp"),
            ("data loader", "trainer.num_workers"), ("confusion matrix update", "label checks")} <= switches
    assert all(a["ratio"] > 0 for a in result["ablations"])
    assert "ablations" in capsys.readouterr().out


def test_ablation_switches_follow_the_device(make_cfg):
    cfg = make_cfg()
    cpu = dict(bench.ablation_switches(cfg, CPU, with_compile=False))
    assert cpu["channels_last"] is True and cpu["amp"] == "bf16" and "cudnn_benchmark" not in cpu
    cuda = dict(bench.ablation_switches(cfg, CUDA, with_compile=True))
    assert cuda["channels_last"] is False and cuda["amp"] == "off" and "cudnn_benchmark" in cuda and cuda["compile"] is True


def test_ratios_are_the_issue_formulas():
    t = {"teacher": 1.0, "student": 2.0, "distill": 3.3, "reference": 6.6, "loader": 0.33}
    assert bench.ratios(t) == pytest.approx({"overhead": 1.1, "speedup_vs_reference": 2.0, "loader_headroom": 10.0})


# ------------------------------------------------------------------ CUDA switches, plumbed on CPU

def test_dtype_policy_and_scaler_only_for_fp16(make_cfg, monkeypatch):
    for amp, dtype, scaler in (("auto", None, False), ("off", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)):
        trainer = _trainer(make_cfg, f"trainer.amp={amp}")
        assert trainer.amp_dtype == dtype and trainer.scaler.is_enabled() is scaler, amp
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert amp_policy("auto", CUDA) == (dtype, dtype == torch.float16)


def test_amp_step_runs_the_network_in_bf16_and_the_losses_in_float32(make_cfg):
    trainer = _trainer(make_cfg, "trainer.amp=bf16", terms=True)
    seen = []
    trainer.student.encoder.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss, parts, _ = trainer.train_step(*_batch())
    assert seen == [torch.bfloat16]
    assert all(v.dtype == torch.float32 for v in parts.values()) and torch.isfinite(loss)
    assert trainer.iteration == 1


def test_channels_last_converts_weights_and_inputs(make_cfg):
    assert not auto_flag("auto", CPU) and auto_flag("auto", CUDA) and auto_flag(True, CPU) and not auto_flag(False, CUDA)
    for value, expected in (("auto", torch.contiguous_format), ("true", torch.channels_last)):
        trainer = _trainer(make_cfg, f"trainer.channels_last={value}", terms=True)
        assert trainer.memory_format == expected
        seen = []
        trainer.student.encoder.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        trainer.train_step(*_batch())
        assert seen[0].is_contiguous(memory_format=expected)
        for model in (trainer.student, trainer.model.teacher):
            assert model.encoder.conv1.weight.is_contiguous(memory_format=expected)


def test_cudnn_switches_and_threads(make_cfg):
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads()
    try:
        for overrides, benchmark, deterministic in (
            ([], True, False),
            (["trainer.deterministic=true"], False, True),
            (["trainer.cudnn_benchmark=false"], False, False),
            (["trainer.deterministic=true", "trainer.cudnn_benchmark=true"], True, True),
        ):
            configure_backends(make_cfg(*overrides).trainer, CUDA)
            assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (benchmark, deterministic), overrides
        configure_backends(make_cfg("trainer.num_threads=1").trainer, CPU)
        assert torch.get_num_threads() == 1
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.set_num_threads(saved[2])


def test_compile_switch_compiles_the_student_in_place(make_cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    _trainer(make_cfg)
    assert calls == []
    trainer = _trainer(make_cfg, "trainer.compile=true", "trainer.compile_mode=max-autotune")
    assert calls == [(trainer.student, {"mode": "max-autotune"})]


def test_loader_pinning_and_persistent_workers():
    data = [_batch(1) for _ in range(4)]
    items = [(img[0], mask[0]) for img, mask in data]
    train, val = build_loaders(items, items, 2, 1, 0, pin_memory=True, persistent_workers=True)
    assert train.pin_memory and val.pin_memory and train.persistent_workers
    train, _ = build_loaders(items, items, 2, 1, 0, persistent_workers=False)
    assert not train.pin_memory and not train.persistent_workers
    train, _ = build_loaders(items, items, 2, 0, 0)
    assert not train.persistent_workers  # no workers, nothing to keep alive


# ------------------------------------------------------------------ no host syncs

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@pytest.fixture
def no_host_sync(monkeypatch):
    """Every Python-level way of reading a tensor's value back to the host raises."""

    def install() -> None:
        for name in SYNCS:
            def boom(*_args, name=name, **_kwargs):
                raise AssertionError(f"host sync: Tensor.{name}")

            monkeypatch.setattr(torch.Tensor, name, boom)

    return install


def test_train_step_never_reads_back_to_the_host(make_cfg, no_host_sync):
    trainer = _trainer(make_cfg, terms=True)
    trainer.train_step(*_batch())  # first step allocates the optimiser state
    no_host_sync()
    loss, parts, _ = trainer.train_step(*_batch())
    assert trainer.iteration == 2


def test_confusion_matrix_update_never_syncs_with_deferred_checks(no_host_sync):
    pred, target = torch.randint(0, 5, (2, 8, 8)), torch.randint(0, 5, (2, 8, 8))
    target[0, 0] = 255
    eager, deferred = ConfusionMatrix(5, eager_checks=True), ConfusionMatrix(5, eager_checks=False)
    eager.update(pred, target)
    no_host_sync()
    deferred.update(pred, target)
    assert torch.equal(deferred.mat, eager.mat)


def test_deferred_label_checks_raise_in_compute():
    pred, target = torch.randint(0, 3, (1, 4, 4)), torch.randint(0, 3, (1, 4, 4))
    target[0, 0, 0], pred[0, 1, 1] = 7, -1
    strict = ConfusionMatrix(3, eager_checks=False)
    strict.update(pred, target)  # no error yet: checking now would wait for the device
    assert int(strict.mat.sum()) == 14 and int(strict.invalid) == 2
    with pytest.raises(ValueError, match=r"2 pixels had labels outside 0..2"):
        strict.compute()
    lenient = ConfusionMatrix(3, strict=False, eager_checks=False)
    lenient.update(pred, target)
    assert lenient.compute()["pixel_acc"] == pytest.approx(float((pred == target).sum()) / 14)
    strict.reset()
    assert int(strict.invalid) == 0 and math.isnan(strict.compute()["miou"])


# ------------------------------------------------------------------ losses: float32 on small tensors

def test_losses_upcast_only_after_reducing():
    torch.manual_seed(0)
    feat_s, feat_t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    low_s, low_t = feat_s.bfloat16(), feat_t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pa, pi = pairwise_loss(low_s, low_t), pixelwise_loss(low_s, low_t)
    assert pa.dtype == pi.dtype == torch.float32
    # max-pooling commutes with the exact bf16 -> fp32 upcast: pooling first changes nothing
    assert torch.equal(pa, pairwise_loss(low_s.float(), low_t.float()))
    torch.testing.assert_close(pi, pixelwise_loss(low_s.float(), low_t.float()), rtol=1e-5, atol=1e-7)


def test_batch_of_one_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--scaling-batches", "1,2"])
    assert "batch sizes must be >= 2" in capsys.readouterr().err
