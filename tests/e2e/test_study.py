"""python -m kdseg.study: bad input is one line before any work; a smoke study (2 methods, 2 trials
each, 2 seeds, tiny data) tunes without reading val, writes the sweeper's results and a summary
with intervals, and a relaunch runs nothing again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kdseg.study import main as study_main
from kdseg.study import drop_trial_checkpoints, tuned_overrides, write_tuned_option
from kdseg.sweep import sweep_id_for

from ..conftest import CONF_DIR, ROOT, SMOKE


def test_bad_study_arguments_are_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = f"out={tmp_path}/study"
    cases = [
        (["nope"], "error: no study 'nope' in"),
        (["fair_zoo", "trails=2"], "error: study argument 'trails=2': expected key=value with a key of fair_zoo.yaml"),
        (["fair_zoo", "trials=0"], "error: study fair_zoo.yaml: trials=0: expected an integer >= 1"),
        (["fair_zoo", "methods=[none]"], "error: study fair_zoo.yaml: methods=['none']: expected a non-empty list of loss options"),
        (["fair_zoo", "until=tuning"], "error: study fair_zoo.yaml: until='tuning': expected one of teacher, tune, final, time, summary"),
        (["fair_zoo", out, "student=resnet19"], "error: job overrides student=resnet19 loss=none: In 'config': Could not find 'student/resnet19'"),
        (["fair_zoo", out, "methods=[kd,nope]"], "error: job overrides student=resnet18 loss=nope: In 'config': Could not find 'loss/nope'"),
        (["fair_zoo", out, "--", "trainer.epochs=0"], "error: config trainer.epochs=0: expected an integer >= 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            study_main(argv)
        assert str(exit_.value).startswith(message) and "\n" not in str(exit_.value), (argv, exit_.value)
        assert not (tmp_path / "study").exists()  # nothing written, nothing trained


def test_a_method_without_a_search_space_is_refused(tmp_path, monkeypatch):
    from kdseg.errors import ConfigError
    from kdseg.study import search_space

    with pytest.raises(ConfigError, match=r"^loss=kd has no search space: add `search:` to conf/loss/kd.yaml"):
        search_space(OmegaConf.create({"loss": {"search": {}}}), "kd")
    with pytest.raises(ConfigError, match=r"^conf/loss/kd.yaml search: trainer.base_lr: expected loss.\* keys only"):
        search_space(OmegaConf.create({"loss": {"search": {"trainer.base_lr": "interval(0.1, 1)"}}}), "kd")


def study(tmp_path: Path, *args: str) -> str:
    """Run the smoke study in tmp_path; returns its output."""
    cmd = [sys.executable, "-m", "kdseg.study", "fair_zoo", "methods=[kd,at]", "trials=2", "seeds=[0,1]", "max_students=2",
           f"out={tmp_path}/study", *args, "--", *SMOKE, "trainer.max_iters=null", "dataset.num_train=20",
           f"paths.data_dir={tmp_path}/data", f"paths.cache_dir={tmp_path}/cache",  # its own teacher, in its own store
           f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_smoke_study_tunes_without_val_then_reports_intervals_and_resumes(tmp_path):
    study(tmp_path, "until=teacher")
    # every val image of the built-in set becomes unreadable: a tuning run that read one would fail
    (root,) = [p for p in (tmp_path / "data").glob("synthetic_*") if p.is_dir()]
    val_ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    saved = {i: (root / "JPEGImages" / f"{i}.jpg").read_bytes() for i in val_ids}
    for i in val_ids:
        (root / "JPEGImages" / f"{i}.jpg").write_bytes(b"not a JPEG: tuning must not read the val split")
    study(tmp_path, "until=tune")
    out = tmp_path / "study"
    state = json.loads((out / "study.json").read_text())
    assert set(state["tuning"]) == {"none", "kd", "at"}
    for option, space in (("none", ["trainer.base_lr"]), ("kd", ["loss.terms.kd.temperature", "loss.terms.kd.weight"]),
                          ("at", ["loss.terms.at.weight"])):
        found = OmegaConf.load(out / "tune" / option / "optimization_results.yaml")
        assert sorted(found.best_params) == space and 0 <= found.best_value <= 1
        assert state["tuning"][option]["value"] == found.best_value
        trials = sorted(p for p in (out / "tune" / option).iterdir() if p.is_dir() and p.name.isdigit())
        assert len(trials) == 2
        for trial in trials:  # trained on the train split less the held-out part, scored on that part
            cfg = OmegaConf.load(trial / ".hydra" / "config.yaml")
            assert cfg.dataset.tune_fraction == 0.2 and cfg.dataset.tune_seed == 0
            if option != "none":  # at the baseline's tuned learning rate
                assert cfg.trainer.base_lr == state["tuning"]["none"]["params"]["trainer.base_lr"]
            assert not list(trial.glob("*.pt")) and (trial / "run.json").is_file()  # checkpoints deleted once tuned
    for i, data in saved.items():
        (root / "JPEGImages" / f"{i}.jpg").write_bytes(data)

    text = study(tmp_path)
    assert "tune finished before" in text and "teacher finished before" in text
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("kdseg").experiment_id
    for option in ("none", "kd", "at"):  # tuning trials upload no checkpoint
        trials = client.search_runs([experiment], f"tags.sweep_id = '{sweep_id_for(out / 'tune' / option)}' and tags.task = 'distill'")
        assert len(trials) == 2 and all(not client.list_artifacts(r.info.run_id, "checkpoints") for r in trials)
    final = client.search_runs([experiment], f"tags.sweep_id = '{sweep_id_for(out / 'final')}' and tags.task = 'distill'")
    assert sorted((r.data.tags["loss"], r.data.params["seed"]) for r in final) == [
        (loss, seed) for loss in ("at", "kd", "none") for seed in ("0", "1")]
    for run in final:  # the whole train split, the tuned values
        assert run.data.params["dataset.tune_fraction"] == "None"
        assert float(run.data.params["trainer.base_lr"]) == state["tuning"]["none"]["params"]["trainer.base_lr"]
        if run.data.tags["loss"] == "kd":
            assert float(run.data.params["loss.terms.kd.weight"]) == state["tuning"]["kd"]["params"]["loss.terms.kd.weight"]
    state = json.loads((out / "study.json").read_text())
    time_stage = state["stages"]["time"]
    assert time_stage["key"] == "trainer.epochs" and time_stage["length"] >= time_stage["base_length"] == 1
    matched = client.search_runs([experiment], f"tags.sweep_id = '{sweep_id_for(out / 'time')}' and tags.task = 'distill'")
    assert len(matched) == (2 if time_stage["length"] > 1 else 0)
    assert all(r.data.params["trainer.epochs"] == str(time_stage["length"]) for r in matched)
    summary = (out / "summary.md").read_text()
    assert "95% CI" in summary and "Δ vs time-matched baseline" in summary and "## Tuned values" in summary
    assert (out / "gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n_runs = len(client.search_runs([experiment], ""))

    text = study(tmp_path)  # finished: nothing is trained again
    assert all(f"{stage} finished before" in text for stage in ("teacher", "tune", "final", "time"))
    assert len(client.search_runs([experiment], "")) == n_runs


def test_a_tuned_options_trial_checkpoints_are_deleted_and_counted_once(tmp_path):
    for job, size in (("0", 1000), ("1", 3000)):
        trial = tmp_path / job
        trial.mkdir()
        (trial / "best.pt").write_bytes(b"b" * size)
        os.link(trial / "best.pt", trial / "last.pt")  # the last epoch was the best: one file, two names
        (trial / "last.prev.pt").write_bytes(b"p" * 10)
        (trial / "run.json").write_text("{}")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "kept.pt").write_bytes(b"x")  # not a trial's folder
    assert drop_trial_checkpoints(tmp_path) == 1000 + 10 + 3000 + 10
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [".hydra/kept.pt", "0/run.json", "1/run.json"]


def test_a_tuned_option_composes_to_the_tuned_values(tmp_path):
    """The final runs' loss options: the method's own option with the best trial's values on top,
    every float exactly as the sweeper found it."""
    params = {"loss.terms.kd.weight": 0.123456789012345, "loss.terms.kd.temperature": 3.3}
    name = write_tuned_option(tmp_path / "conf", "kd", params, "kd at its tuned values")
    assert name == "tuned_kd" and (tmp_path / "conf" / "loss" / "tuned_kd.yaml").read_text().startswith("# kd at its tuned values\n")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "loss=tuned_kd"])
    assert cfg.loss.terms.kd.weight == params["loss.terms.kd.weight"] and cfg.loss.terms.kd.temperature == 3.3
    assert cfg.loss.terms.cwd.weight == 0 and cfg.loss.pi_lambda == 0  # only kd is on, as in loss=kd
    assert tuned_overrides({"trainer.base_lr": 0.00123456789}) == ["trainer.base_lr=0.00123456789"]


def test_a_stages_wall_time_counts_every_launch_that_worked_on_it(tmp_path, monkeypatch):
    """A stage that fails (a full disk, say) and is finished by a relaunch records the time of both launches."""
    import kdseg.study as study_module
    from kdseg.errors import KdsegError

    monkeypatch.chdir(tmp_path)
    clock = iter([0.0, 30.0, 100.0, 105.0])  # launch 1: 30 s, then fails; launch 2: 5 s
    monkeypatch.setattr(study_module.time, "perf_counter", lambda: next(clock))
    calls = []

    def teacher(study):
        calls.append(1)
        if len(calls) == 1:
            raise KdsegError("disk full")
        return {"teacher": "T.pt"}

    monkeypatch.setitem(study_module.STAGE_FUNCTIONS, "teacher", teacher)
    args = ("fair_zoo", ["methods=[kd]", "until=teacher", f"out={tmp_path}/study"], [])
    with pytest.raises(KdsegError, match="disk full"):
        study_module.run_study(*args)
    assert json.loads((tmp_path / "study" / "study.json").read_text())["spent_s"] == {"teacher": 30.0}
    study_module.run_study(*args)
    state = json.loads((tmp_path / "study" / "study.json").read_text())
    assert state["stages"]["teacher"] == {"teacher": "T.pt", "wall_s": 35.0}
