"""End-to-end smoke runs of the three tasks, checked through what a user sees: files and MLflow."""
from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from kdseg.checkpoint import load_checkpoint
from kdseg.main import run, teacher_cache_path


def mlflow_run(cfg, run_name: str):
    client = MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time DESC"])
    assert runs, f"no MLflow run named {run_name}"
    return client, runs[0]


def test_distill_smoke_run_logs_everything(make_cfg, tmp_path):
    cfg = make_cfg("student=resnet18", "loss.pi_lambda=100", "logger.run_name=e2e-distill")
    miou = run(cfg)
    assert 0.0 <= miou <= 1.0
    out = tmp_path / "out"
    for name in ("best.pt", "last.pt", "predictions.png", "per_class_iou.md", "config.yaml"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model"]["encoder_name"] == "resnet18" and ckpt["model"]["classes"] == 21
    assert math.isclose(ckpt["metrics"]["miou"], miou)
    client, mrun = mlflow_run(cfg, "e2e-distill")
    assert mrun.data.params["loss.pi_lambda"] == "100"
    assert mrun.data.tags["task"] == "distill" and mrun.data.tags["loss"] == "pi_pa"
    assert math.isclose(mrun.data.metrics["val/miou"], miou)
    for key in ("train/loss_ce", "train/loss_pi", "train/loss_pa", "train/lr", "val/pixel_acc", "time/epoch_s", "throughput/img_s", "teacher/val_miou"):
        assert key in mrun.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(mrun.info.run_id, "checkpoints")}
    assert {"predictions.png", "per_class_iou.md", "config.yaml", "checkpoints/best.pt", "checkpoints/last.pt"} <= artifacts
    assert mrun.info.status == "FINISHED"


def test_teacher_is_cached_and_reused(make_cfg, capsys):
    cfg = make_cfg("loss=pi")
    run(cfg)
    path = teacher_cache_path(cfg)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    run(make_cfg("loss=pa", "seed=1"))
    assert "training one" not in capsys.readouterr().out
    assert path.stat().st_mtime_ns == stamp


def test_smoke_teacher_key_differs_from_default_budget(make_cfg):
    smoke = make_cfg()
    real = make_cfg(smoke=False)
    assert teacher_cache_path(smoke) != teacher_cache_path(real)
    assert teacher_cache_path(smoke) == teacher_cache_path(make_cfg("seed=3", "loss=pa"))


def test_baseline_builds_no_teacher(make_cfg, monkeypatch):
    import kdseg.main

    def no_teacher(*args, **kwargs):
        raise AssertionError("loss=none must not build a teacher")

    monkeypatch.setattr(kdseg.main, "get_teacher", no_teacher)
    assert 0.0 <= run(make_cfg("loss=none")) <= 1.0


def test_same_seed_same_metrics(make_cfg, tmp_path):
    first = run(make_cfg("loss=pi_pa", "seed=5", "trainer.max_iters=3", "logger.run_name=det-a"))
    second = run(make_cfg("loss=pi_pa", "seed=5", "trainer.max_iters=3", "logger.run_name=det-b"))
    assert first == second
    cfg = make_cfg()
    _, a = mlflow_run(cfg, "det-a")
    _, b = mlflow_run(cfg, "det-b")
    assert a.data.metrics["train/loss"] == b.data.metrics["train/loss"]


def test_teacher_and_eval_tasks(make_cfg, tmp_path):
    miou = run(make_cfg("task=teacher", "logger.run_name=t-task"))
    ckpt = tmp_path / "out" / "last.pt"
    assert load_checkpoint(ckpt)["model"]["encoder_name"] == "resnet101"
    assert run(make_cfg("task=eval", f"checkpoint={ckpt}")) == pytest.approx(miou)


def test_real_data_without_teacher_checkpoint_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.root"):
        run(make_cfg("dataset=voc", f"dataset.root={tmp_path}/nowhere", "trainer=smoke", smoke=False))
