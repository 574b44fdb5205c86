"""A NaN loss stops a run naming the term and iteration, keeping the last good checkpoint."""
from __future__ import annotations

import itertools

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdseg.checkpoint import load_checkpoint
from kdseg.distill import Distiller
from kdseg.errors import NonFiniteLossError
from kdseg.resume import read_run
from kdseg.tasks import run


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


