"""The training loop (kdseg.train): the NaN / inf guard, fp16 skipped steps, and a distillation step on CUDA."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdseg.distill import Distiller
from kdseg.checkpoint import load_checkpoint
from kdseg.errors import DeviceMemoryError, NonFiniteLossError, TrainingInterrupted
from kdseg.losses import PairwiseLoss, PixelwiseLoss
from kdseg.models import build_model
from kdseg.train import NonFiniteGuard, Trainer, evaluate


def test_guard_names_the_first_bad_term_and_iteration():
    guard = NonFiniteGuard()
    finite = {"ce": torch.tensor(1.0), "pi": torch.tensor(0.5)}
    guard.add(1, torch.tensor(1.5), finite)
    guard.check()
    guard.add(2, torch.tensor(1.5), finite)
    guard.add(3, torch.tensor(float("inf")), {"ce": torch.tensor(1.0), "pi": torch.tensor(float("inf"))})
    guard.add(4, torch.tensor(float("nan")), {"ce": torch.tensor(float("nan")), "pi": torch.tensor(0.5)})
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at iteration 3: loss_pi = inf, loss = inf; training stopped, see$"):
        guard.check(", see")


class Toy(nn.Module):
    """A 1x1-conv 'student' whose fp16 gradients overflow at the scaler's initial scale."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Conv2d(3, 21, 1)

    def forward(self, images, masks):
        logits = self.student(images)
        ce = F.cross_entropy(logits.float(), masks)
        return ce, {"ce": ce.detach()}, logits


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")  # the skipped step
def test_fp16_skipped_steps_are_counted_not_errors(make_cfg, tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = 100 * torch.randn(16, 3, 8, 8, generator=generator)
    masks = torch.randint(0, 21, (16, 8, 8), generator=generator)
    train = DataLoader(TensorDataset(images, masks), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(images[:4], masks[:4]), batch_size=2)
    cfg = make_cfg("trainer.amp=fp16", "trainer.channels_last=false", "trainer.max_iters=null").trainer
    logged = []
    trainer = Trainer(Toy(), train, val, cfg=cfg, epochs=1, num_classes=21, out_dir=tmp_path, model_config={},
                      log=lambda metrics, step: logged.append(metrics), device=torch.device("cpu"))
    assert trainer.scaler.is_enabled()
    trainer.fit()
    skipped = logged[0]["train/amp_skipped_steps"]
    assert 1 <= skipped < 8 and trainer.iteration == 8
    assert trainer.scaler.get_scale() == 65536.0 / 2**skipped


def test_a_trainer_sets_no_process_wide_switch(make_cfg, tmp_path):
    """Threads and cuDNN flags belong to the process: set once when a task starts (kdseg.runtime), never by a Trainer."""
    before = torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    cfg = make_cfg(f"trainer.num_threads={before[0] + 1}", "trainer.deterministic=true", "trainer.cudnn_benchmark=true").trainer
    Trainer(Toy(), [None], [None], cfg=cfg, epochs=1, num_classes=21, out_dir=tmp_path, model_config={}, device=torch.device("cpu"))
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == before


@pytest.mark.gpu
def test_distillation_step_and_evaluation_on_cuda_with_amp_auto(make_cfg, tmp_path):
    """The default speed switches on a GPU: autocast in bf16 (fp16 + GradScaler where bf16 is missing),
    channels_last, the frozen teacher left untouched, finite losses, and an evaluation under autocast."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", classes=21), build_model("resnet18", classes=21)
    model = Distiller(student, teacher, {"pi": PixelwiseLoss(100), "pa": PairwiseLoss(1)}, input_size=64)
    frozen = {name: value.clone() for name, value in teacher.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    images, masks = torch.randn(2, 3, 64, 64, generator=generator), torch.randint(0, 21, (2, 64, 64), generator=generator)
    batches = [(images, masks)]
    trainer = Trainer(model, batches, batches, cfg=make_cfg("trainer.device=cuda").trainer, epochs=1, num_classes=21,
                      out_dir=tmp_path, model_config={}, device=device)
    bf16 = torch.cuda.is_bf16_supported()
    assert trainer.amp_dtype == (torch.bfloat16 if bf16 else torch.float16) and trainer.scaler.is_enabled() is not bf16
    assert trainer.memory_format == torch.channels_last
    loss, parts, _ = trainer.train_step(images, masks)
    assert loss.is_cuda and set(parts) == {"ce", "pi", "pa"}
    assert torch.isfinite(loss) and all(torch.isfinite(value) for value in parts.values())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value.cpu(), frozen[name]), name
    result = evaluate(trainer.student, batches, 21, device, trainer.amp_dtype)
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["pixel_acc"] <= 1.0


def test_all_void_batches_are_counted_and_training_goes_on(make_cfg, tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 8, 8, generator=generator)
    masks = torch.randint(0, 21, (8, 8, 8), generator=generator)
    masks[:2] = 255  # the first batch (in order) has no labelled pixel
    train = DataLoader(TensorDataset(images, masks), batch_size=2)
    val = DataLoader(TensorDataset(images[2:4], masks[2:4]), batch_size=2)
    cfg = make_cfg("trainer.max_iters=null", "trainer.amp=off", "trainer.channels_last=false").trainer
    logged = []
    model = Distiller(nn.Conv2d(3, 21, 1))
    trainer = Trainer(model, train, val, cfg=cfg, epochs=2, num_classes=21, out_dir=tmp_path, model_config={},
                      log=lambda metrics, step: logged.append(metrics), device=torch.device("cpu"))
    trainer.fit()
    assert [m["train/void_batches"] for m in logged] == [1, 1] and trainer.iteration == 8
    assert all(torch.isfinite(torch.tensor(m["train/loss_ce"])) for m in logged)


def test_cuda_out_of_memory_in_a_step_is_one_line_with_batch_crop_switches_and_checkpoint(make_cfg, tmp_path, monkeypatch):
    images, masks = torch.randn(6, 3, 16, 16), torch.randint(0, 21, (6, 16, 16))
    train = DataLoader(TensorDataset(images, masks), batch_size=3)
    cfg = make_cfg("trainer.max_iters=null", "trainer.amp=off", "trainer.channels_last=false", "trainer.batch_size=3").trainer
    trainer = Trainer(Distiller(nn.Conv2d(3, 21, 1)), train, train, cfg=cfg, epochs=2, num_classes=21, out_dir=tmp_path,
                      model_config={}, device=torch.device("cpu"))
    step = trainer.train_step

    def out_of_memory_in_epoch_2(images, masks):
        if trainer.iteration == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(images, masks)

    monkeypatch.setattr(trainer, "train_step", out_of_memory_in_epoch_2)
    with pytest.raises(DeviceMemoryError) as err:
        trainer.fit()
    assert str(err.value) == (
        "CUDA out of memory in training step 3 on cpu with a per-process batch of 3 images (trainer.batch_size=3) of 16x16 "
        "(dataset.crop_size); lower it with trainer.amp=bf16 (now off), trainer.channels_last=true (now false), or a smaller "
        "trainer.batch_size with the same global batch over more processes (torchrun --nproc_per_node=N); "
        f"the last good checkpoint is '{tmp_path / 'last.pt'}' (epoch 1)"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__


class Flipped(TensorDataset):
    """Random horizontal flips drawn from the global RNG in the loading process (as the real transforms draw)."""

    def __getitem__(self, index):
        image, mask = super().__getitem__(index)
        return (image.flip(-1), mask.flip(-1)) if torch.rand(()) < 0.5 else (image, mask)


def _signal_trainer(make_cfg, out_dir, num_workers: int = 0) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    images, masks = torch.randn(12, 3, 8, 8, generator=generator), torch.randint(0, 21, (12, 8, 8), generator=generator)
    loader = DataLoader(Flipped(images, masks), batch_size=2, shuffle=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(images[:4], masks[:4]), batch_size=2)
    cfg = make_cfg("trainer.max_iters=null", "trainer.amp=off", "trainer.channels_last=false").trainer
    torch.manual_seed(2)
    student = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Dropout2d(0.5), nn.Conv2d(8, 21, 1))  # dropout draws from the RNG too
    return Trainer(Distiller(student), loader, val, cfg=cfg, epochs=2, num_classes=21, out_dir=out_dir,
                   model_config={"encoder_name": "toy", "classes": 21, "output_stride": 16}, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "stop, workers",
    [(signal.SIGTERM, 0), pytest.param(signal.SIGUSR1, 1, marks=pytest.mark.slow)],  # a worker process: slow to start
    ids=["SIGTERM", "SIGUSR1-worker"],
)
def test_a_stop_signal_mid_epoch_checkpoints_the_position_and_resuming_from_it_is_bit_exact(
    make_cfg, tmp_path, monkeypatch, stop, workers
):
    """6 steps an epoch; the signal arrives in step 9 (step 3 of epoch 2). The resumed trainer re-reads the
    epoch's first 3 batches (in this process, or in a worker seeded from the loader's generator) and ends
    with the uninterrupted run's weights and per-epoch metrics."""
    torch.manual_seed(3)
    reference = _signal_trainer(make_cfg, tmp_path / "reference", workers)
    reference.fit()
    torch.manual_seed(3)
    stopped = _signal_trainer(make_cfg, tmp_path / "run", workers)
    step = stopped.train_step

    def signalled_step(images, masks):
        if stopped.iteration == 8:
            os.kill(os.getpid(), stop)  # delivered now; the step still finishes
        return step(images, masks)

    monkeypatch.setattr(stopped, "train_step", signalled_step)
    with pytest.raises(TrainingInterrupted, match=rf"^stopped by {stop.name} after step 3 of epoch 2 \(iteration 9\);"):
        stopped.fit()
    assert signal.getsignal(stop) is signal.SIG_DFL
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["position"]["steps"] == 3 and ckpt["iteration"] == 9 and len(ckpt["history"]) == 1
    torch.manual_seed(4)  # whatever the new process's RNG: the checkpoint decides
    resumed = _signal_trainer(make_cfg, tmp_path / "run", workers)
    resumed.restore(ckpt)
    resumed.fit()
    for (name, value), expected in zip(resumed.student.state_dict().items(), reference.student.state_dict().values()):
        assert torch.equal(value, expected), name
    drop = ("time/epoch_s", "throughput/img_s", "memory/peak_mib")
    assert [{k: v for k, v in m.items() if k not in drop} for m in resumed.history] == [
        {k: v for k, v in m.items() if k not in drop} for m in reference.history
    ]


def test_a_stop_signal_between_epochs_keeps_the_epoch_checkpoint(make_cfg, tmp_path, monkeypatch):
    trainer = _signal_trainer(make_cfg, tmp_path)
    log = trainer.log

    def signal_after_epoch_1(metrics, step):
        log(metrics, step)
        os.kill(os.getpid(), signal.SIGTERM)

    trainer.log = signal_after_epoch_1
    with pytest.raises(TrainingInterrupted, match=r"^stopped by SIGTERM after epoch 1 \(iteration 6\);"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1 and "position" not in ckpt
