"""End-to-end smoke runs of the three tasks, checked through what a user sees: files and MLflow."""
from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdseg.checkpoint import load_checkpoint
from kdseg.data import build_datasets
from kdseg.data.classes import SYNTHETIC_CLASSES
from kdseg.data.synthetic import generate
from kdseg.errors import CheckpointError, ConfigError
from kdseg.tasks import run
from kdseg.job import build
from kdseg.teacher import cache_path as teacher_cache_path
from kdseg.teacher import get_teacher


def mlflow_run(cfg, run_name: str):
    client = MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time DESC"])
    assert runs, f"no MLflow run named {run_name}"
    return client, runs[0]


def test_distill_smoke_run_logs_everything(make_cfg, tmp_path):
    cfg = make_cfg("student=resnet18", "loss.pi_lambda=100", "logger.run_name=e2e-distill", "logger.log_checkpoints=all")
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
    assert mrun.data.tags["task"] == "distill" and mrun.data.tags["loss"] == "pi+pa"
    assert math.isclose(mrun.data.metrics["val/miou"], miou)
    for key in ("train/loss_ce", "train/loss_pi", "train/loss_pa", "train/lr", "val/pixel_acc", "time/epoch_s", "throughput/img_s", "teacher/val_miou",
                "memory/peak_mib", "speed/student_gflops", "speed/student_latency_ms", "speed/student_fps", "speed/teacher_gflops", "speed/teacher_fps"):
        assert key in mrun.data.metrics, key
    # the real-time figures at the dataset's eval size: ResNet-18 < ResNet-101, fps = 1000 / latency
    metrics = mrun.data.metrics
    assert 0 < metrics["speed/student_gflops"] < metrics["speed/teacher_gflops"]
    assert metrics["speed/student_fps"] == pytest.approx(1000 / metrics["speed/student_latency_ms"])
    assert mrun.data.tags["speed_device"] == "cpu, batch 1 at 64x64" and "measured once" in mrun.data.tags["speed_method"]
    # the teacher's figures are its architecture's: the cached teacher's own run logged the very same
    teacher_run = client.search_runs([mrun.info.experiment_id], f"tags.teacher_cache = '{teacher_cache_path(cfg).name}'")[0]
    assert {key: metrics[key] for key in metrics if key.startswith("speed/teacher_")} == {
        key: value for key, value in teacher_run.data.metrics.items() if key.startswith("speed/teacher_")}
    # the built-in set's classes by their own names (shape-texture), in the metrics and the per-class table
    ious = {key.removeprefix("val/iou/") for key in metrics if key.startswith("val/iou/")}
    assert ious and ious <= set(SYNTHETIC_CLASSES) and "background" in ious and "cat" not in ious
    table = (out / "per_class_iou.md").read_text()
    assert all(f"| {name} | {100 * metrics[f'val/iou/{name}']:.2f} |" in table for name in ious) and "| cat |" not in table
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(mrun.info.run_id, "checkpoints")}
    assert {"predictions.png", "per_class_iou.md", "config.yaml", "checkpoints/best.pt", "checkpoints/last.pt"} <= artifacts
    assert mrun.info.status == "FINISHED"


def test_default_upload_is_the_best_student_alone(make_cfg, tmp_path):
    """logger.log_checkpoints=student (the default): one checkpoint in MLflow, the best epoch's
    student weights; the run folder keeps the full states, last.pt a link to best.pt when the last
    epoch was the best."""
    cfg = make_cfg("loss=kd", "logger.run_name=e2e-upload", "logger.log_checkpoints=student", "trainer.epochs=2", "trainer.max_iters=null")
    run(cfg)
    out = tmp_path / "out"
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and (out / "last.pt").samefile(out / "best.pt") == (best["epoch"] == 2)
    assert "optimizer" in best and "optimizer" in last
    client, mrun = mlflow_run(cfg, "e2e-upload")
    uploaded = [a.path for a in client.list_artifacts(mrun.info.run_id, "checkpoints")]
    assert uploaded == ["checkpoints/best_student.pt"]
    local = client.download_artifacts(mrun.info.run_id, "checkpoints/best_student.pt", str(tmp_path))
    student = torch.load(local, weights_only=True)
    assert set(student) == {"state_dict", "model"}
    assert all(torch.equal(value, best["state_dict"][key]) for key, value in student["state_dict"].items())
    assert student["state_dict"].keys() == best["state_dict"].keys()


def test_logged_model_is_the_best_student_and_its_only_upload(make_cfg, tmp_path, capsys, monkeypatch):
    """logger.log_model=true: the best epoch's student as an MLflow PyTorch model, which
    mlflow.pytorch.load_model("runs:/<id>/student") loads and which predicts the checkpoint's logits;
    with it, best_student.pt is not uploaded again (one copy of the student in MLflow)."""
    import mlflow
    import mlflow.pytorch

    from kdseg.checkpoint import load_model

    import kdseg.tracking

    monkeypatch.setattr(kdseg.tracking, "SYSTEM_METRICS_INTERVAL_S", 1)  # a sample a second: a smoke run is short
    cfg = make_cfg("loss=kd", "logger.run_name=e2e-model", "logger.log_model=true", "logger.system_metrics=true")
    run(cfg)
    client, mrun = mlflow_run(cfg, "e2e-model")
    assert f"mlflow.pytorch.load_model('runs:/{mrun.info.run_id}/student')" in capsys.readouterr().out
    assert [a.path for a in client.list_artifacts(mrun.info.run_id, "checkpoints")] == []
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    logged = mlflow.pytorch.load_model(f"runs:/{mrun.info.run_id}/student")
    reference, _ = load_model(tmp_path / "out" / "best.pt")
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(logged.eval()(images), reference.eval()(images))
    (model,) = client.search_logged_models([mrun.info.experiment_id], filter_string=f"source_run_id = '{mrun.info.run_id}'")
    assert model.name == "student"
    assert any(key.startswith("system/") for key in mrun.data.metrics)  # logger.system_metrics: MLflow's monitor


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


def test_the_cached_teachers_runs_record_the_teacher(make_cfg, tmp_path):
    """The cached teacher's training run (started by a student's job) and an eval of it describe the teacher."""
    cfg = make_cfg("seed=5", "student=mobilenet_v2", "teacher.model.encoder_name=resnet18", "teacher.train.seed=2")
    path = teacher_cache_path(cfg)
    get_teacher(cfg, build_datasets(cfg.dataset), build(cfg.teacher.model), torch.device("cpu"))
    client = MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    (trun,) = client.search_runs([experiment.experiment_id], f"tags.teacher_cache = '{path.name}'")
    params, tags = trun.data.params, trun.data.tags
    assert (tags["task"], tags["teacher"], tags["student"], tags["loss"], tags["seed"]) == ("teacher", "resnet18", "-", "ce", "2")
    assert "sweep_id" not in tags and tags["teacher_cache_key"] in path.name
    assert (params["task"], params["seed"], params["teacher.train.seed"], params["teacher_cache"]) == ("teacher", "2", "2", path.name)
    assert tags["run_dir"] == str((path.parent / f"{path.stem}-run").resolve()) and "paths.output_dir" not in params
    assert "mlflow.parentRunId" not in tags and tags["mlflow.note.content"].startswith("**teacher** `resnet18`")
    assert params["trainer.epochs"] == str(cfg.teacher.train.epochs)
    assert not any(key.startswith(("student.", "loss.", "logger.")) for key in params)
    assert load_checkpoint(path)["config"]["teacher.train.seed"] == 2
    # an eval of the cached teacher (task=eval without a checkpoint) is named and tagged after it
    run(make_cfg("task=eval", "seed=5", "teacher.model.encoder_name=resnet18", "teacher.train.seed=2"))
    (erun,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = 'eval-teacher-resnet18-seed2-{path.stem}'")
    assert (erun.data.tags["trained_task"], erun.data.tags["seed"]) == ("teacher", "2")
    assert erun.data.tags["trained_in_run"] == trun.info.run_id and erun.data.params["checkpoint"] == str(path)


def test_smoke_teacher_key_differs_from_default_budget(make_cfg):
    smoke = make_cfg()
    real = make_cfg(smoke=False)
    assert teacher_cache_path(smoke) != teacher_cache_path(real)
    assert teacher_cache_path(smoke) == teacher_cache_path(make_cfg("seed=3", "loss=pa"))


def test_baseline_builds_no_teacher(make_cfg, monkeypatch):
    import kdseg.tasks.distill

    def no_teacher(*args, **kwargs):
        raise AssertionError("loss=none must not build a teacher")

    monkeypatch.setattr(kdseg.tasks.distill, "get_teacher", no_teacher)
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
    """A readable VOC-layout folder (written by the generator, read as dataset=voc): the data is
    fine, so the run stops at the teacher, and none is trained (only generated datasets cache one)."""
    root = generate(tmp_path / "VOC2012", 4, 2, 64, seed=0)
    cfg = make_cfg("dataset=voc", f"dataset.root={root}", "dataset.base_size=64", "dataset.crop_size=64", "trainer=smoke", smoke=False)
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint is null and dataset=voc: train a teacher first \(python run\.py task=teacher"):
        run(cfg)
    assert not teacher_cache_path(cfg).exists()


BASELINES = ("kd", "cwd", "at", "fitnet", "dist", "ifvd")


def test_every_baseline_together_trains_and_logs_its_term(make_cfg):
    """One smoke run with all six baselines at once (loss=[kd,cwd,...]): each term is logged."""
    cfg = make_cfg(f"loss=[{','.join(BASELINES)}]", "logger.run_name=e2e-zoo")
    assert 0.0 <= run(cfg) <= 1.0
    _, mrun = mlflow_run(cfg, "e2e-zoo")
    assert mrun.data.tags["loss"] == "+".join(BASELINES)
    for name in BASELINES:
        assert math.isfinite(mrun.data.metrics[f"train/loss_{name}"]), name
    assert "train/loss_pi" not in mrun.data.metrics and mrun.data.params["loss.term_order"].startswith("pi,pa,kd")
    assert mrun.data.metrics["memory/peak_mib"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", (*BASELINES, "cirkd", "afdcd"))
def test_each_baseline_runs_a_smoke_job(make_cfg, method):
    cfg = make_cfg(f"loss={method}", f"logger.run_name=e2e-{method}")
    run(cfg)
    _, mrun = mlflow_run(cfg, f"e2e-{method}")
    assert mrun.data.tags["loss"] == method and f"train/loss_{method}" in mrun.data.metrics


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dkd", "aicsd", "bpkd"])
def test_each_label_or_schedule_method_runs_a_smoke_job(make_cfg, method):
    """The logit methods that read the labels (dkd, bpkd) or the training progress (aicsd): loss=<name> trains and logs its term."""
    cfg = make_cfg(f"loss={method}", f"logger.run_name=e2e-{method}")
    run(cfg)
    _, mrun = mlflow_run(cfg, f"e2e-{method}")
    assert mrun.data.tags["loss"] == method and math.isfinite(mrun.data.metrics[f"train/loss_{method}"])


def test_fitnet_adapter_is_saved_with_the_student_but_not_in_it(make_cfg, tmp_path):
    """Channels differ at encoder.layer4 (ResNet-18: 512, ResNet-101: 2048): the adapter is trained,
    kept in the checkpoint's ``terms`` and restored on resume; the student's weights stay the student's."""
    from kdseg.checkpoint import load_model

    overrides = ("loss=fitnet", "loss.terms.fitnet.tap=encoder.layer4")
    run(make_cfg(*overrides))
    ckpt = load_checkpoint(tmp_path / "out" / "last.pt")
    assert ckpt["terms"]["fitnet.adapter.0.weight"].shape == (2048, 512, 1, 1)
    assert "fitnet.adapter.1.running_mean" in ckpt["terms"]
    assert not any("adapter" in key for key in ckpt["state_dict"])
    student, _ = load_model(tmp_path / "out" / "last.pt")
    assert set(student.state_dict()) == set(ckpt["state_dict"])
    # resuming from it restores the adapter (a missing one is a clear error)
    from kdseg.distill import Distiller, build_terms
    from kdseg.train import Trainer

    cfg = make_cfg(*overrides)
    model = Distiller(student, load_model(teacher_cache_path(cfg))[0], build_terms(cfg.loss.terms))
    loader = torch.utils.data.DataLoader(range(4), batch_size=2, generator=torch.Generator())
    trainer = Trainer(model, loader, loader, cfg=cfg.trainer, epochs=1, num_classes=21, out_dir=tmp_path / "x",
                      model_config=ckpt["model"])
    trainer.restore(ckpt, "last.pt")
    torch.testing.assert_close(model.terms.state_dict()["fitnet.adapter.0.weight"], ckpt["terms"]["fitnet.adapter.0.weight"])
    with pytest.raises(CheckpointError, match="does not hold the learned parts of this run's loss terms"):
        trainer.restore(ckpt | {"terms": {}}, "old.pt")
