"""A NaN / inf loss stops the run naming the term and iteration; fp16 skipped steps are not errors."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdseg.checkpoint import load_checkpoint
from kdseg.distill import Distiller
from kdseg.errors import NonFiniteLossError
from kdseg.main import run
from kdseg.resume import read_run
from kdseg.train import NonFiniteGuard, Trainer


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


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    original, calls = Distiller.forward, itertools.count(1)

    def forward(self, images, masks):
        total, parts, logits = original(self, images, masks)
        if next(calls) == 6:  # epoch 2 (4 iterations per epoch), second iteration
            total, parts = total * float("nan"), {**parts, "ce": parts["ce"] * float("nan")}
        return total, parts, logits

    monkeypatch.setattr(Distiller, "forward", forward)
    cfg = make_cfg("loss=none", "dataset.num_train=8", "trainer.max_iters=null", "trainer.epochs=3", "logger.run_name=nan-run")
    last = tmp_path / "out" / "last.pt"
    message = (rf"non-finite loss at iteration 6: loss_ce = nan, loss = nan; training stopped; "
               rf"the last good checkpoint is '{last}' \(epoch 1\)")
    with pytest.raises(NonFiniteLossError, match=message):
        run(cfg)
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert read_run(tmp_path / "out")["status"] == "failed"
    client = MlflowClient(cfg.logger.tracking_uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("kdseg").experiment_id], "attributes.run_name = 'nan-run'")
    assert mrun.info.status == "FAILED"


class Toy(nn.Module):
    """A 1x1-conv 'student' whose fp16 gradients overflow at the scaler's initial scale."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Conv2d(3, 21, 1)

    def forward(self, images, masks):
        logits = self.student(images)
        ce = F.cross_entropy(logits.float(), masks)
        return ce, {"ce": ce.detach()}, logits


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
