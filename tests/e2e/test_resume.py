"""Resuming interrupted runs: bit-identical results, one MLflow run, damaged checkpoints.

Every run here is the same tiny CE-only job (3 epochs of 4 iterations); the uninterrupted
run is computed once per module and every interrupted-and-resumed run must end with
exactly its metrics.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import kdseg.tracking
from kdseg.checkpoint import load_checkpoint, save_checkpoint
from kdseg.errors import ResumeError
from kdseg.resume import plan_run, read_run
from kdseg.tasks import run

from ..conftest import ROOT, SMOKE, compose_config

JOB = [*SMOKE, "loss=none", "dataset.num_train=8", "trainer.max_iters=null", "trainer.epochs=3"]
COMPARED = ("train/loss", "train/loss_ce", "train/lr", "val/miou", "val/pixel_acc")


def paths(root: Path, session_dir: Path, out: Path | None = None) -> list[str]:
    """The conftest ``make_cfg`` paths, with the run folder ``out`` (None: Hydra's run dir)."""
    overrides = [
        f"paths.root_dir={root}",
        f"paths.data_dir={session_dir}/data",
        f"paths.cache_dir={session_dir}/cache",
        f"logger.tracking_uri=sqlite:///{session_dir}/mlflow.db",
    ]
    return overrides + ([f"paths.output_dir={out}"] if out else [])


def job(root: Path, session_dir: Path, out: Path, *overrides: str):
    return compose_config([*paths(root, session_dir, out), *JOB, *overrides])


def history(out: Path) -> list[dict[str, float]]:
    return [{k: m[k] for k in COMPARED} for m in load_checkpoint(out / "last.pt")["history"]]


@pytest.fixture(scope="module")
def reference(session_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, list[dict]]:
    """Final mIoU and per-epoch metrics of the uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    miou = run(job(root, session_dir, root / "out", "logger.run_name=resume-reference"))
    return miou, history(root / "out")


def interrupt_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Stop the process right after epoch ``epoch`` has written its checkpoint (as Ctrl-C would)."""
    original = kdseg.tracking.Tracker.log_metrics

    def log_metrics(self, metrics, step):
        original(self, metrics, step)
        if step == epoch and "train/loss" in metrics:
            raise KeyboardInterrupt

    monkeypatch.setattr(kdseg.tracking.Tracker, "log_metrics", log_metrics)


def mlflow_runs(session_dir: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{session_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("kdseg")
    return client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")


def test_resumed_run_matches_uninterrupted_run_in_one_mlflow_run(reference, session_dir, tmp_path, monkeypatch):
    cfg = job(tmp_path, session_dir, tmp_path / "out", "logger.run_name=resume-inproc")
    with monkeypatch.context() as patch:
        interrupt_after_epoch(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    assert load_checkpoint(tmp_path / "out" / "last.pt")["epoch"] == 1
    assert read_run(tmp_path / "out")["status"] == "failed"
    miou = run(cfg)
    assert miou == reference[0]
    assert history(tmp_path / "out") == reference[1]
    assert read_run(tmp_path / "out")["status"] == "finished"
    (mrun,) = mlflow_runs(session_dir, "resume-inproc")
    assert mrun.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(f"sqlite:///{session_dir}/mlflow.db").get_metric_history(mrun.info.run_id, "val/miou")]
    assert sorted(steps) == [1, 2, 3]


def test_truncated_last_checkpoint_falls_back_to_previous(reference, session_dir, tmp_path, monkeypatch, capsys):
    cfg = job(tmp_path, session_dir, tmp_path / "out", "logger.run_name=resume-truncated")
    with monkeypatch.context() as patch:
        interrupt_after_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    last = tmp_path / "out" / "last.pt"
    assert load_checkpoint(tmp_path / "out" / "last.prev.pt")["epoch"] == 1
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    miou = run(cfg)
    out = capsys.readouterr().out
    assert f"'{last}' is not a readable kdseg checkpoint: the file is truncated" in out
    assert "resuming from the previous checkpoint" in out and "last.prev.pt' (epoch 1)" in out
    assert miou == reference[0]
    assert history(tmp_path / "out") == reference[1]
    assert len(mlflow_runs(session_dir, "resume-truncated")) == 1


def test_truncated_checkpoint_without_previous_is_a_clear_error(session_dir, tmp_path, monkeypatch):
    cfg = job(tmp_path, session_dir, tmp_path / "out", "logger.run_name=resume-nothing")
    with monkeypatch.context() as patch:
        interrupt_after_epoch(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    last = tmp_path / "out" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ResumeError, match=r"cannot resume: .*last\.pt' is not a readable kdseg checkpoint: the file is truncated.*trainer\.resume=off"):
        run(cfg)
    assert run(job(tmp_path, session_dir, tmp_path / "out", "logger.run_name=resume-nothing", "trainer.resume=off")) >= 0


def test_finished_run_is_not_resumed_and_other_config_is_refused(session_dir, tmp_path):
    out = tmp_path / "out"
    config = {"a": 1}
    plan = plan_run("auto", out, config)
    assert not plan.resuming
    with plan.active("distill"):
        save_checkpoint(out / "last.pt", state_dict={}, model={}, epoch=1, rng={}, run_uid=plan.run_uid)
    assert not plan_run("auto", out, config).resuming  # finished: a rerun starts afresh
    with pytest.raises(KeyboardInterrupt), plan.active("distill"):
        raise KeyboardInterrupt
    resumed = plan_run("auto", out, config)
    assert resumed.resuming and resumed.run_uid == plan.run_uid and resumed.checkpoint["epoch"] == 1
    with pytest.raises(ResumeError, match="unfinished run of another config.*trainer.resume=off"):
        plan_run("auto", out, {"a": 2})
    assert not plan_run("off", out, {"a": 2}).resuming


def test_a_run_still_running_is_not_resumed(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    config = {"a": 1}
    plan = plan_run("auto", first, config, cache_dir=tmp_path / "cache")
    with plan.active("distill", tmp_path / "cache"):
        save_checkpoint(first / "last.pt", state_dict={}, model={}, epoch=1, rng={}, run_uid=plan.run_uid)
        again = plan_run("auto", second, config, cache_dir=tmp_path / "cache")  # the same command, launched twice
        assert not again.resuming and again.out_dir == second
        assert f"the run of this config in '{first}' is still running" in capsys.readouterr().out
        with pytest.raises(ResumeError, match="in use by another running kdseg process"):
            plan_run("auto", first, config)
    assert plan_run("auto", second, config, cache_dir=tmp_path / "cache").out_dir == second  # finished now


def test_stale_checkpoint_of_an_earlier_run_is_not_resumed(tmp_path):
    out = tmp_path / "out"
    save_checkpoint(out / "last.pt", state_dict={}, model={}, epoch=5, rng={}, run_uid="earlier")
    plan = plan_run("off", out, {"a": 1})
    with pytest.raises(KeyboardInterrupt), plan.active("distill"):
        raise KeyboardInterrupt  # interrupted before its first checkpoint
    again = plan_run("auto", out, {"a": 1})
    assert not again.resuming and again.run_uid != plan.run_uid


def test_resume_from_explicit_path_reports_changed_keys(tmp_path, capsys):
    out = tmp_path / "run"
    save_checkpoint(out / "last.pt", state_dict={}, model={}, epoch=2, rng={}, run_uid="u1", config={"a": 1, "b": 2})
    plan = plan_run(str(out), tmp_path / "new", {"a": 1, "b": 3})
    assert plan.resuming and plan.out_dir == out and plan.run_uid == "u1"
    assert "changed config: b" in capsys.readouterr().out
    with pytest.raises(ResumeError, match="no such checkpoint"):
        plan_run(str(tmp_path / "absent.pt"), tmp_path / "new", {})
    save_checkpoint(tmp_path / "weights.pt", state_dict={}, model={})
    with pytest.raises(ResumeError, match="weights only"):
        plan_run(str(tmp_path / "weights.pt"), tmp_path / "new", {})


def run_py(root: Path, session_dir: Path, run_dir: Path, name: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "run.py"), *paths(root, session_dir), *JOB,
        f"logger.run_name={name}", f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_killed_run_resumes_from_a_new_launch(reference, session_dir, tmp_path):
    """SIGKILL after the first epoch's checkpoint; the same command (new Hydra folder) finishes the run."""
    first, second = tmp_path / "outputs" / "first", tmp_path / "outputs" / "second"
    proc = subprocess.Popen(run_py(tmp_path, session_dir, first, "resume-killed"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1800
    while not (first / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    killed_at = load_checkpoint(first / "last.pt")["epoch"]
    assert killed_at < 3
    assert read_run(first)["status"] == "running"

    done = subprocess.run(run_py(tmp_path, session_dir, second, "resume-killed"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming {first} after epoch {killed_at}" in done.stdout
    assert not (second / "last.pt").exists()
    assert history(first) == reference[1]
    assert torch.load(first / "last.pt", weights_only=True)["metrics"]["miou"] == reference[0]
    (mrun,) = mlflow_runs(session_dir, "resume-killed")
    assert mrun.info.status == "FINISHED" and mrun.data.metrics["val/miou"] == reference[0]
    client = MlflowClient(f"sqlite:///{session_dir}/mlflow.db")
    assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")) == [1, 2, 3]


CIRKD = ["loss=cirkd", "loss.terms.cirkd.pixel_memory_size=64", "loss.terms.cirkd.region_memory_size=8",
         "loss.terms.cirkd.pixels_per_update=4"]
"""A CIRKD job with small queues: a term whose state (queues, pointers, step) must resume too."""


@pytest.mark.slow
def test_killed_cirkd_run_resumes_with_its_queues_bit_identically(session_dir, tmp_path):
    """SIGKILL after the first epoch's checkpoint; the relaunch ends with the uninterrupted run's
    metrics and the very same queues, which are saved with the terms and not in the student."""
    from kdseg.checkpoint import load_model

    reference = tmp_path / "reference"
    run(job(tmp_path, session_dir, reference, "logger.run_name=cirkd-reference", *CIRKD))
    first, second = tmp_path / "outputs" / "first", tmp_path / "outputs" / "second"
    command = [*run_py(tmp_path, session_dir, first, "cirkd-killed"), *CIRKD]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1800
    while not (first / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert load_checkpoint(first / "last.pt")["epoch"] < 3
    command[command.index(f"hydra.run.dir={first}")] = f"hydra.run.dir={second}"
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming" in done.stdout
    assert history(first) == history(reference)
    resumed, uninterrupted = load_checkpoint(first / "last.pt"), load_checkpoint(reference / "last.pt")
    assert resumed["terms"]["cirkd.step"].item() == 3 * 4  # 3 epochs of 4 iterations
    assert resumed["terms"].keys() == uninterrupted["terms"].keys()
    for key, value in uninterrupted["terms"].items():
        assert torch.equal(resumed["terms"][key], value), key
    assert not any(key.startswith("cirkd") or "queue" in key for key in resumed["state_dict"])
    student, _ = load_model(first / "last.pt")
    assert set(student.state_dict()) == set(resumed["state_dict"])
