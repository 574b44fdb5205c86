"""Fused sweeps (hydra/launcher=fused): members train as they would alone, groups form as documented,
a killed fused sweep resumes, and the cases it cannot reproduce are refused in one line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

import kdseg.dist
import kdseg.train
from kdseg.errors import ConfigError, TrainingInterrupted
from kdseg.fused.feed import SharedVal
from kdseg.fused.group import Member, carry_draws, group_key, run_group
from kdseg.fused.launch import batches, launch
from kdseg.resume import read_run
from kdseg.runtime import resolve_device, rng_state
from kdseg.tasks import run

from ..conftest import CONF_DIR, ROOT, SMOKE, compose_config

# 4 steps an epoch on 16 images; augmentations in a worker process, so that PSPNet's dropout (drawn
# from the global stream, which the group sets to each member's in its turn) is allowed
SCHEDULE = ["trainer.max_iters=null", "trainer.epochs=2", "trainer.batch_size=4", "trainer.num_workers=1"]
SETTINGS = {  # a baseline, a feature term, a term with a learned adapter (PSPNet's 512 channels -> the teacher's 256)
    "none": ["loss=none"],
    "pi_pa": ["loss=pi_pa"],
    "fitnet": ["loss=fitnet", "student=pspnet_resnet18"],
}
NOT_COMPARED = ("time/", "throughput/", "memory/")  # wall-clock figures


def member_cfg(tmp_path: Path, session_dir: Path, name: str, folder: str, *extra: str):
    return compose_config([
        *SMOKE, *SCHEDULE, *SETTINGS[name], *extra, f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / folder / name}",
        f"paths.data_dir={session_dir}/data", f"paths.cache_dir={session_dir}/cache",
        f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"logger.run_name={folder}-{name}",
    ])


def compared(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if not k.startswith(NOT_COMPARED)} for epoch in history]


def test_a_fused_group_trains_each_member_exactly_as_it_trains_alone(tmp_path, session_dir, capsys):
    """Three settings run alone, then as one fused group: equal weights, adapters, optimizer states,
    RNG states, per-epoch metrics and MLflow metric histories."""
    for name in SETTINGS:
        run(member_cfg(tmp_path, session_dir, name, "alone"))
    cfgs = [member_cfg(tmp_path, session_dir, name, "fused") for name in SETTINGS]
    capsys.readouterr()
    members = run_group(cfgs, resolve_device("cpu"))
    assert [m.failed for m in members] == [False, False, False], [m.result for m in members]
    epochs = [line.split("  loss")[0] for line in capsys.readouterr().out.splitlines() if "  loss " in line]
    assert epochs == [f"[{student} {label} seed 0] epoch {e}/2" for e in (1, 2)
                      for student, label in (("resnet18", "none"), ("resnet18", "pi+pa"), ("pspnet-resnet18", "fitnet"))]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("kdseg").experiment_id])}
    for name, member in zip(SETTINGS, members):
        alone = torch.load(tmp_path / "alone" / name / "last.pt", weights_only=False)
        fused = torch.load(tmp_path / "fused" / name / "last.pt", weights_only=False)
        assert member.result == alone["metrics"]["miou"]
        assert alone["iteration"] == fused["iteration"] == 8
        for part in ("state_dict", "terms"):
            assert alone[part].keys() == fused[part].keys()
            assert all(torch.equal(alone[part][k], fused[part][k]) for k in alone[part]), f"{name}: {part} differs"
        assert all(
            torch.equal(a[k], b[k])
            for a, b in zip(alone["optimizer"]["state"].values(), fused["optimizer"]["state"].values()) for k in a
        )
        assert torch.equal(alone["rng"]["torch"], fused["rng"]["torch"]) and torch.equal(alone["rng"]["loader"], fused["rng"]["loader"])
        assert compared(alone["history"]) == compared(fused["history"])
        assert read_run(tmp_path / "fused" / name)["status"] == "finished"
        a, f = runs[f"alone-{name}"], runs[f"fused-{name}"]
        assert f.info.status == "FINISHED"
        assert {k: v for k, v in a.data.params.items() if not k.startswith("paths.") and k != "logger.run_name"} == {
            k: v for k, v in f.data.params.items() if not k.startswith("paths.") and k != "logger.run_name"}
        for key in ("train/loss", "val/miou", "train/lr"):
            steps = lambda run_id: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]  # noqa: E731
            assert steps(a.info.run_id) == steps(f.info.run_id), f"{name}: {key}"
    adapter = torch.load(tmp_path / "fused" / "fitnet" / "last.pt", weights_only=False)["terms"]
    assert any(value.dim() == 4 and value.shape[:2] == (256, 512) for value in adapter.values())  # a 1x1 conv 512 -> 256


def test_members_agree_on_everything_but_student_and_loss():
    base = ["trainer=smoke"]
    key = lambda *o: group_key(compose_config([*base, *o, "paths.root_dir=/r", "paths.output_dir=/r/out"]))  # noqa: E731
    same = key("loss=none")
    assert key("loss=pi_pa") == same and key("student=segformer_b0", "loss=kd") == same
    assert key("logger.run_name=x") == same
    for other in ("seed=1", "teacher=deeplabv3_resnet101", "trainer.batch_size=4", "dataset.crop_size=32", "eval=ms_flip"):
        assert key(other) != same, other


def test_batches_fuse_distillation_jobs_by_key_in_groups_of_max_students(monkeypatch):
    monkeypatch.setattr("kdseg.fused.launch.group_key", lambda cfg: cfg.key)
    job = lambda i, key, task="distill": SimpleNamespace(idx=i, fusable=task == "distill", resolved=SimpleNamespace(key=key))  # noqa: E731
    jobs = [job(0, "a"), job(1, "b"), job(2, "a"), job(3, "a", task="teacher"), job(4, "a"), job(5, "b")]
    assert [[j.idx for j in b] for b in batches(jobs, 2)] == [[0, 2], [1, 5], [3], [4]]
    assert [[j.idx for j in b] for b in batches(jobs, 8)] == [[0, 2, 4], [1, 5], [3]]


def test_a_step_that_draws_random_numbers_with_loader_draws_in_the_same_stream_is_refused():
    """num_workers=0: the loader's augmentations draw from the global stream; a member whose stream is not
    where the fetching member's was would have seen other augmentations alone: one ConfigError naming the fix."""
    cfg = compose_config(["trainer=smoke", "student=segformer_b0", "paths.root_dir=/r", "paths.output_dir=/r/out"])
    torch.manual_seed(0)
    before = rng_state()
    torch.rand(3)
    after = rng_state()
    fetcher, clean, drew = (Member(cfg, steps=None, rng=before) for _ in range(3))
    torch.rand(1)
    drew.rng = rng_state()
    carry_draws(fetcher, [fetcher, clean], (before, after))
    assert torch.equal(clean.rng["torch"], after["torch"])  # the member that did not draw follows the loader's draws
    with pytest.raises(ConfigError, match=r"drew from it differently \(dropout or drop path: the segformer-mit_b0 student of /r/out "
                                          r"against the segformer-mit_b0 student of /r/out\); set trainer.num_workers=1 or more"):
        carry_draws(fetcher, [fetcher, drew], (before, after))


def test_fused_launcher_composes_and_refuses_several_processes(monkeypatch, tmp_path):
    overrides = ["hydra/launcher=fused", "hydra.launcher.max_students=3", f"hydra.sweep.dir={tmp_path}/sweep"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.kdseg_fused_launcher.fused_launcher.FusedLauncher"
    assert cfg.hydra.launcher.max_students == 3
    with pytest.raises(SystemExit, match=r"^error: hydra.launcher.max_students=0: expected 1 or more students per group$"):
        launch(SimpleNamespace(config=cfg, max_students=0), [["seed=0"]], 0)
    monkeypatch.setattr(kdseg.dist, "launched_distributed", lambda: True)  # (as under torchrun)
    with pytest.raises(SystemExit, match=r"^error: hydra/launcher=fused trains a group's students in one process; under torchrun"):
        launch(SimpleNamespace(config=cfg, max_students=3), [["seed=0"]], 0)
    assert not (tmp_path / "sweep").exists()  # refused before anything is written


@pytest.mark.slow
def test_a_killed_fused_sweep_relaunched_finishes_only_what_was_unfinished(tmp_path, session_dir):
    """Two groups (seed 0, seed 1) of two members; SIGKILL once the second group has written a checkpoint;
    the same command trains only the second group's remaining epochs and ends with the metrics of an
    uninterrupted fused sweep."""
    def cmd(sweep_dir: Path, uri: str) -> list[str]:
        return [
            sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=fused", "seed=0,1", "loss=none,kd", *SMOKE,
            "trainer.max_iters=null", "trainer.epochs=3", "trainer.batch_size=4", "trainer.num_workers=1",
            f"paths.data_dir={session_dir}/data", f"paths.cache_dir={session_dir}/cache",
            f"hydra.sweep.dir={sweep_dir}", f"logger.tracking_uri={uri}",
        ]

    whole = subprocess.run(cmd(tmp_path / "whole", f"sqlite:///{tmp_path}/whole.db"), cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert "4 jobs: 4 in 2 fused group(s)" in whole.stdout + whole.stderr

    sweep, uri = tmp_path / "killed", f"sqlite:///{tmp_path}/killed.db"
    proc = subprocess.Popen(cmd(sweep, uri), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1800
    while not (sweep / "3" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert [read_run(sweep / str(i))["status"] for i in range(4)] == ["finished", "finished", "running", "running"]
    finished = {i: (sweep / str(i) / "last.pt").stat().st_mtime_ns for i in (0, 1)}

    again = subprocess.run(cmd(sweep, uri), cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {i: (sweep / str(i) / "last.pt").stat().st_mtime_ns for i in (0, 1)} == finished  # not trained again
    for i in range(4):
        assert read_run(sweep / str(i))["status"] == "finished"
        resumed = torch.load(sweep / str(i) / "last.pt", weights_only=False)
        reference = torch.load(tmp_path / "whole" / str(i) / "last.pt", weights_only=False)
        assert compared(resumed["history"]) == compared(reference["history"]), i
        assert all(torch.equal(resumed["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"]), i


def test_the_val_batches_are_decoded_once_for_every_member_within_the_budget():
    decoded = []

    class Loader(list):
        dataset, sampler, batch_size = "val set", None, 2

        def __iter__(self):
            for i in range(3):
                batch = (torch.full((2, 3, 4, 4), float(i)), torch.zeros(2, 4, 4, dtype=torch.long))
                decoded.append(i)
                yield batch

        def __len__(self):
            return 3

    val = SharedVal(Loader(), budget_mib=1)
    next(iter(val))  # a figure's first batch: nothing kept
    first = list(val)
    assert decoded == [0, 0, 1, 2] and len(val) == 3 and val.dataset == "val set"
    again = list(val)
    assert decoded == [0, 0, 1, 2] and all(a is b for a, b in zip(first, again))  # the same tensors, not decoded again
    tight = SharedVal(Loader(), budget_mib=2 * (2 * 3 * 16 * 4 + 2 * 16 * 8) / 2**20)  # room for two of the three batches
    list(tight), list(tight)
    assert decoded[4:] == [0, 1, 2, 0, 1, 2] and tight.kept is None


@pytest.mark.slow
def test_sigterm_stops_every_member_after_the_same_step_and_the_group_resumes_bit_identically(tmp_path, session_dir, monkeypatch):
    names = ("none", "pi_pa")
    whole = run_group([member_cfg(tmp_path, session_dir, name, "whole") for name in names], resolve_device("cpu"))
    assert [m.failed for m in whole] == [False, False]

    cfgs = [member_cfg(tmp_path, session_dir, name, "stopped") for name in names]
    original = kdseg.train.Trainer.train_step

    def train_step(self, images, masks):  # SIGTERM during the first member's step 6 (step 2 of epoch 2)
        if self.iteration + 1 == 6 and "none" in str(self.out_dir):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, images, masks)

    with monkeypatch.context() as patch:
        patch.setattr(kdseg.train.Trainer, "train_step", train_step)
        stopped = run_group(cfgs, resolve_device("cpu"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    for member in stopped:
        assert member.failed and isinstance(member.result, TrainingInterrupted), member.result
        assert str(member.result).startswith("stopped by SIGTERM after step 2 of epoch 2 (iteration 6)")
    for name in names:
        assert read_run(tmp_path / "stopped" / name)["status"] == "interrupted"
    resumed = run_group(cfgs, resolve_device("cpu"))
    for name, member, reference in zip(names, resumed, whole):
        assert not member.failed and member.result == reference.result
        a = torch.load(tmp_path / "whole" / name / "last.pt", weights_only=False)
        b = torch.load(tmp_path / "stopped" / name / "last.pt", weights_only=False)
        assert compared(a["history"]) == compared(b["history"])
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_members_from_one_random_state_build_the_teacher_once(make_cfg):
    """build_networks with a group's teacher_draws: a second member that starts from the same random
    state (same seed and student) skips the teacher's build and leaves the streams, and its student,
    exactly where building it would."""
    from kdseg.runtime import rng_digest
    from kdseg.tasks.distill import build_networks

    alone = build_networks(make_cfg("loss=kd"))
    after_alone = rng_digest()
    draws: dict = {}
    first = build_networks(make_cfg("loss=pi_pa"), draws)
    assert first[2] is not None and len(draws) == 1  # built, its draws remembered
    second = build_networks(make_cfg("loss=kd"), draws)
    assert second[2] is None and len(draws) == 1  # replayed
    assert rng_digest() == after_alone
    assert all(torch.equal(a, b) for a, b in zip(alone[1].state_dict().values(), second[1].state_dict().values()))
    other_seed = build_networks(make_cfg("loss=kd", "seed=1"), draws)
    assert other_seed[2] is not None and len(draws) == 2  # another state: built
    assert build_networks(make_cfg("loss=none"), draws)[2] is None and len(draws) == 2  # no teacher at all
