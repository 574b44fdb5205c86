"""Resuming interrupted runs: bit-identical results, one MLflow run, damaged checkpoints.

Every run here is the same tiny CE-only job (3 epochs of 4 iterations); the uninterrupted
run is computed once per module and every interrupted-and-resumed run must end with
exactly its metrics.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import kdseg.tracking
import kdseg.train
from kdseg.checkpoint import load_checkpoint, save_checkpoint
from kdseg.errors import DiskFullError, ResumeError, TrainingInterrupted
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


def fill_disk_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, checkpoint: Path, limit: list[int]) -> None:
    """After epoch ``epoch`` is logged, no file may grow past half of ``checkpoint`` (a full disk for the next one):
    the soft RLIMIT_FSIZE, with SIGXFSZ ignored so a write fails with EFBIG instead of killing the process."""
    original = kdseg.tracking.Tracker.log_metrics

    def log_metrics(self, metrics, step):
        original(self, metrics, step)
        if step == epoch and "train/loss" in metrics:
            limit.append(checkpoint.stat().st_size // 2)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit[-1], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    monkeypatch.setattr(kdseg.tracking.Tracker, "log_metrics", log_metrics)


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_fails_the_run_and_a_relaunch_resumes(reference, session_dir, tmp_path, monkeypatch):
    cfg = job(tmp_path, session_dir, tmp_path / "out", "logger.run_name=resume-full-disk")
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit: list[int] = []
    try:
        with monkeypatch.context() as patch:
            fill_disk_after_epoch(patch, 1, tmp_path / "out" / "last.pt", limit)
            with pytest.raises(DiskFullError) as err:
                run(cfg)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(err.value)
    assert limit and "\n" not in message
    assert message.startswith(f"cannot write checkpoint '{tmp_path / 'out'}/") and "File too large (" in message
    assert " free there, about " in message and "run the same command again" in message
    out = tmp_path / "out"
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # the previous checkpoint, intact
    assert not list(out.glob(".*.tmp*"))  # no temporary file left
    assert read_run(out)["status"] == "failed"
    (mrun,) = mlflow_runs(session_dir, "resume-full-disk")
    assert mrun.info.status == "FAILED"
    assert run(cfg) == reference[0]  # space freed: the same command resumes after epoch 1
    assert history(out) == reference[1]
    assert read_run(out)["status"] == "finished"


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


def test_resume_from_a_folder_without_checkpoints_says_what_it_expected(tmp_path):
    with pytest.raises(ResumeError, match=rf"^trainer.resume='{tmp_path}' is a folder without last.pt or last.prev.pt: "
                                          "expected a checkpoint file or a run folder holding last.pt$"):
        plan_run(str(tmp_path), tmp_path / "out", {"a": 1})


def sigterm_at_iteration(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """SIGTERM to this process during training step ``iteration`` (as SLURM's scancel would send it)."""
    original = kdseg.train.Trainer.train_step

    def train_step(self, images, masks):
        if self.iteration + 1 == iteration:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, images, masks)

    monkeypatch.setattr(kdseg.train.Trainer, "train_step", train_step)


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_the_position_and_the_same_command_ends_like_an_uninterrupted_run(
    reference, session_dir, tmp_path, monkeypatch
):
    cfg = job(tmp_path, session_dir, tmp_path / "out", "logger.run_name=resume-sigterm")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        sigterm_at_iteration(patch, 6)  # step 2 of epoch 2 (4 steps an epoch)
        with pytest.raises(TrainingInterrupted) as err:
            run(cfg)
    assert str(err.value) == (f"stopped by SIGTERM after step 2 of epoch 2 (iteration 6); '{out / 'last.pt'}' holds this "
                              "position: run the same command again to continue from it")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives as long as training
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 6 and ckpt["position"]["steps"] == 2
    assert load_checkpoint(out / "last.prev.pt")["epoch"] == 1  # the epoch's checkpoint, kept
    assert read_run(out)["status"] == "interrupted"
    (mrun,) = mlflow_runs(session_dir, "resume-sigterm")
    assert mrun.info.status == "KILLED"
    assert run(cfg) == reference[0]
    assert history(out) == reference[1]  # train/loss of epoch 2 too: its first two steps' sums were kept
    assert read_run(out)["status"] == "finished"


@pytest.mark.slow
def test_sigterm_to_run_py_is_one_line_and_the_same_command_resumes(reference, session_dir, tmp_path):
    """SIGTERM (what scancel and SLURM pre-emption send) after the first epoch's checkpoint: one line, exit code 1,
    the run marked interrupted; the same command (new Hydra folder) ends with the uninterrupted run's metrics."""
    first, second = tmp_path / "outputs" / "first", tmp_path / "outputs" / "second"
    proc = subprocess.Popen(run_py(tmp_path, session_dir, first, "resume-sigterm-cli"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1800
    while not (first / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: stopped by SIGTERM after ") and line.endswith("run the same command again to continue from it")
    assert read_run(first)["status"] == "interrupted"
    (mrun,) = mlflow_runs(session_dir, "resume-sigterm-cli")
    assert mrun.info.status == "KILLED"
    subprocess.run(run_py(tmp_path, session_dir, second, "resume-sigterm-cli"), cwd=tmp_path, check=True,
                   stdout=subprocess.DEVNULL, timeout=1800)
    assert history(first) == reference[1] and read_run(first)["status"] == "finished"


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
