"""The eval config through runs: task=eval in each mode, and training's evaluation with it."""
from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdseg.checkpoint import load_checkpoint, model_config, save_checkpoint
from kdseg.models import build_model
from kdseg.tasks import run
from kdseg.tracking.fields import select_params

# ------------------------------------------------------------------------------ evaluate()


# ------------------------------------------------------------------------------ through run.py's tasks


def latest_run(cfg, name: str):
    client = MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    return client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"])[0]


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
    latest = latest_run(make_cfg(), "eval-resnet18-model")  # no training config stored: named by its model
    params, tags = latest.data.params, latest.data.tags
    assert params["evaluation.eval.mode"] == "whole" and params["evaluation.eval.flip"] == "True"
    assert params["evaluation.eval.scales"] == "[0.5, 1.0]" and params["evaluation.dataset.num_val"] == "4"
    assert params["checkpoint"] == str(ckpt) and ckpt.is_absolute()
    assert (tags["task"], tags["trained_task"], tags["model"], tags["student"], tags["seed"]) == ("eval", "-", "resnet18", "-", "-")
    assert "trained_in_run" not in tags
    assert math.isclose(latest.data.metrics["val/miou"], ms)


def test_an_eval_run_records_the_evaluated_checkpoint_and_its_training_run(make_cfg, tmp_path, monkeypatch):
    """The eval command's own student/loss/seed/epochs differ from the checkpoint's: the record follows the checkpoint."""
    trained = make_cfg("loss=pi", "seed=3", "student=mobilenet_v2", "logger.run_name=eval-source")
    run(trained)
    monkeypatch.chdir(tmp_path)
    ckpt = load_checkpoint(tmp_path / "out" / "best.pt")
    run(make_cfg("task=eval", "checkpoint=out/best.pt", "seed=0", "trainer.epochs=7", "loss=pa", "eval.flip=true",
                 "paths.output_dir=" + str(tmp_path / "eval")))
    record = latest_run(trained, "eval-mobilenet_v2-pi-seed3-best")
    params, tags = record.data.params, record.data.tags
    assert {key: tags[key] for key in ("task", "trained_task", "student", "teacher", "loss", "dataset", "seed", "model")} == {
        "task": "eval", "trained_task": "distill", "student": "mobilenet_v2", "teacher": "resnet101", "loss": "pi",
        "dataset": "synthetic", "seed": "3", "model": "mobilenet_v2"}
    # params: the checkpoint's training settings under their own keys (no plumbing, no inactive term), the eval's under evaluation.
    for key, value in select_params(ckpt["config"]).items():
        assert key == "checkpoint" or params[key] == str(value), key  # the training's own `checkpoint` key is unused (null)
    assert "teacher.model._target_" not in params and not any(key.startswith("loss.terms.pa.") for key in params)
    assert (params["seed"], params["trainer.epochs"], params["loss.terms.pi.weight"]) == ("3", "1", str(ckpt["config"]["loss.terms.pi.weight"]))
    assert params["evaluation.eval.flip"] == "True" and params["evaluation.dataset.name"] == "synthetic"
    assert params["checkpoint"] == str(tmp_path / "out" / "best.pt")  # absolute, though given relative
    source = latest_run(trained, "eval-source")
    assert tags["trained_in_run"] == ckpt["mlflow_run_id"] == source.info.run_id
    assert tags["trained_in_run_name"] == "eval-source" and source.info.run_id in tags["mlflow.note.content"]


@pytest.mark.slow
def test_training_evaluates_with_the_eval_config(make_cfg, tmp_path):
    slide = ["eval=slide", "eval.crop=32", "eval.stride=16"]
    teacher = ["teacher.model.encoder_name=resnet18"]
    miou = run(make_cfg("task=teacher", *teacher, "logger.run_name=inference-teacher", *slide))
    ckpt = tmp_path / "out" / "last.pt"
    assert run(make_cfg("task=eval", *teacher, f"checkpoint={ckpt}", *slide)) == pytest.approx(miou)
