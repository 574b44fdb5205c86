"""The eval config through runs: task=eval in each mode, and training's evaluation with it."""
from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdseg.checkpoint import model_config, save_checkpoint
from kdseg.models import build_model
from kdseg.tasks import run

# ------------------------------------------------------------------------------ evaluate()


# ------------------------------------------------------------------------------ through run.py's tasks


def latest_eval_run(cfg):
    client = MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    return client.search_runs([experiment.experiment_id], "attributes.run_name = 'eval-model'", order_by=["attributes.start_time DESC"])[0]


def test_task_eval_in_each_mode(make_cfg, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("resnet18", classes=21)
    ckpt = save_checkpoint(tmp_path / "model.pt", state_dict=model.state_dict(), model=model_config(make_cfg().student), metrics={})

    def evaluate_with(*overrides: str) -> float:
        return run(make_cfg("task=eval", f"checkpoint={ckpt}", "dataset.num_val=4", *overrides))

    whole = evaluate_with()
    assert "(eval whole)" in capsys.readouterr().out
    assert evaluate_with("eval=slide") == whole  # one window as large as the 64 px images
    slide = evaluate_with("eval=slide", "eval.crop=32", "eval.stride=32")
    assert "(eval slide 32x32 / 32x32)" in capsys.readouterr().out
    ms = evaluate_with("eval=ms_flip", "eval.scales=[0.5,1.0]")  # the default 6 scales: test_eval_group_options
    assert all(0.0 <= miou <= 1.0 for miou in (slide, ms))
    latest = latest_eval_run(make_cfg())
    assert latest.data.params["eval.mode"] == "whole" and latest.data.params["eval.flip"] == "True"
    assert math.isclose(latest.data.metrics["val/miou"], ms)


@pytest.mark.slow
def test_training_evaluates_with_the_eval_config(make_cfg, tmp_path):
    slide = ["eval=slide", "eval.crop=32", "eval.stride=16"]
    teacher = ["teacher.model.encoder_name=resnet18"]
    miou = run(make_cfg("task=teacher", *teacher, "logger.run_name=inference-teacher", *slide))
    ckpt = tmp_path / "out" / "last.pt"
    assert run(make_cfg("task=eval", *teacher, f"checkpoint={ckpt}", *slide)) == pytest.approx(miou)
