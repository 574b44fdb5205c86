"""MLflow tracking wrapper (kdseg.tracking): flattened params, run status, retries and the pending-operations file."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from kdseg.tracking import PENDING_FILE, Tracker
from kdseg.utils import flatten

from ..flaky_store import FlakyStore, steps


def test_flatten_joins_nested_keys_and_keeps_lists():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_run_status_finished_or_failed(session_dir):
    uri = f"sqlite:///{session_dir}/mlflow.db"
    tracker = Tracker(uri, "tracking-test")
    with tracker.run("ok", {"x": 1}, {"task": "test"}) as ok_id:
        tracker.log_metrics({"val/miou": 0.5}, 1)
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.run("bad", {"x": 2}, {"task": "test"}) as bad_id:
            raise RuntimeError("boom")
    client = MlflowClient(uri)
    ok, bad = client.get_run(ok_id), client.get_run(bad_id)
    assert ok.info.status == "FINISHED" and ok.data.metrics["val/miou"] == 0.5 and ok.data.params["x"] == "1"
    assert bad.info.status == "FAILED"


def test_disabled_tracker_does_nothing():
    tracker = Tracker("sqlite:////nonexistent/dir/mlflow.db", "x", enabled=False)
    with tracker.run("r", {}, {}) as run_id:
        tracker.log_metrics({"a": 1.0}, 0)
    assert run_id is None


def test_transient_failure_is_retried(session_dir, monkeypatch, capsys):
    uri = f"sqlite:///{session_dir}/mlflow.db"
    tracker = Tracker(uri, "tracking-test", retries=2, retry_wait_s=0)
    store = FlakyStore(monkeypatch)
    with tracker.run("retried", {}, {}) as run_id:
        store.fail_next = 2
        tracker.log_metrics({"val/miou": 0.25}, 1)
    assert steps(uri, run_id, "val/miou") == [1]
    assert capsys.readouterr().out.count("retry") == 2 and not tracker.pending


def test_store_down_mid_run_keeps_metrics_and_sends_them_later(session_dir, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{session_dir}/mlflow.db"
    tracker = Tracker(uri, "tracking-test", retries=1, retry_wait_s=0)
    store = FlakyStore(monkeypatch)
    pending = tmp_path / PENDING_FILE
    with tracker.run("outage", {}, {}, run_dir=tmp_path) as run_id:
        tracker.log_metrics({"val/miou": 0.1}, 1)
        store.down = True
        tracker.log_metrics({"val/miou": 0.2}, 2)
        tracker.log_metrics({"val/miou": 0.3}, 3)
        assert f"kept in {pending}" in capsys.readouterr().out
        assert len(pending.read_text().splitlines()) == 2
        store.down = False
        tracker.log_metrics({"val/miou": 0.4}, 4)
    assert steps(uri, run_id, "val/miou") == [1, 2, 3, 4]
    assert not pending.exists()
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_store_down_at_the_end_leaves_a_file_that_can_be_sent(session_dir, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient as Client

    from kdseg.tracking.__main__ import main as send_pending

    uri = f"sqlite:///{session_dir}/mlflow.db"
    tracker = Tracker(uri, "tracking-test", retries=0, retry_wait_s=0)
    with tracker.run("outage-end", {}, {}, run_dir=tmp_path) as run_id:
        FlakyStore(monkeypatch).down = True
        monkeypatch.setattr(Client, "set_terminated", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
        tracker.log_metrics({"val/miou": 0.5}, 1)
    out = capsys.readouterr().out
    assert f"2 MLflow operation(s) of run {run_id} could not be sent" in out
    assert f"python -m kdseg.tracking {tmp_path / PENDING_FILE}" in out
    monkeypatch.undo()
    assert send_pending([str(tmp_path / PENDING_FILE)]) == 0
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["val/miou"] == 0.5 and run.info.status == "FINISHED"
    assert not (tmp_path / PENDING_FILE).exists()


def test_experiment_created_by_a_parallel_job_is_reused(session_dir, monkeypatch):
    """Two jobs starting at once both miss the experiment; the one that loses the create reuses it."""
    uri = f"sqlite:///{session_dir}/mlflow.db"
    first = Tracker(uri, "race-test")
    lookup = MlflowClient.get_experiment_by_name
    calls = []

    def lost_race(self, name):
        calls.append(name)
        return None if len(calls) == 1 else lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lost_race)
    assert Tracker(uri, "race-test").experiment_id == first.experiment_id
    assert len(calls) == 2


def test_sqlite_store_keeps_artifacts_next_to_its_file(session_dir, tmp_path, monkeypatch):
    """Not in ./mlruns of the working directory (MLflow's default for database stores)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{session_dir}/artifacts-test.db"
    tracker = Tracker(uri, "artifacts-test")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with tracker.run("artifacts", {}, {}) as run_id:
        tracker.log_artifact(note)
    uri_root = MlflowClient(uri).get_run(run_id).info.artifact_uri
    assert uri_root.startswith((session_dir / "mlartifacts").as_uri())
    assert (session_dir / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


# ------------------------------------------------------------------------------ standard fields (kdseg.tracking.fields)


def test_params_leave_out_plumbing_and_the_options_of_inactive_terms():
    from kdseg.tracking.fields import select_params

    flat = {
        "seed": 0, "student._target_": "kdseg.models.build_model", "student.encoder_name": "resnet18",
        "trainer.optimizer._partial_": True, "trainer.optimizer.momentum": 0.9,
        "logger.run_name": None, "paths.output_dir": "/x", "hydra.job.name": "run",
        "loss.search.loss.terms.kd.weight": "tag(log, interval(0.1, 10))",
        "loss.pi_lambda": 100, "loss.terms.pi.weight": 100, "loss.terms.pi.tap": "decoder.block2.1",
        "loss.terms.kd.weight": 0, "loss.terms.kd.temperature": 4.0, "loss.terms.kd._target_": "kdseg.losses.kd.KDLoss",
        "loss.terms.at.weight": "oops", "loss.terms.at.p": 2,
    }
    assert select_params(flat) == {
        "seed": 0, "student.encoder_name": "resnet18", "trainer.optimizer.momentum": 0.9,
        "loss.pi_lambda": 100, "loss.terms.pi.weight": 100, "loss.terms.pi.tap": "decoder.block2.1",
    }


def test_run_params_of_the_default_job_are_settings_only(make_cfg):
    """The default job's params: no plumbing, and of the zoo's terms only its own two."""
    from kdseg.tracking import run_params

    cfg = make_cfg()
    params = run_params(cfg, 1)
    assert not [k for k in params if k.startswith(("logger.", "paths.", "hydra.")) or k.endswith(("_target_", "_partial_"))]
    active = {k.split(".")[2] for k in params if k.startswith("loss.terms.")}
    assert active == {"pi", "pa"} and params["loss.terms.pi.weight"] == 100 and params["dist.world_size"] == 1
    assert len([k for k in params if k.startswith("loss.terms.")]) < len(cfg.loss.terms) * 2  # the zoo's 14 terms are not listed


def test_git_state_reads_commit_and_dirty_tree(tmp_path):
    import subprocess

    from kdseg.tracking.fields import git_state

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    assert git_state(tmp_path / "nowhere") == ("unknown", None)
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = git("rev-parse", "HEAD")
    git_state.cache_clear()
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "untracked.txt").write_text("x")  # untracked files do not make a tree dirty
    git_state.cache_clear()
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "a.txt").write_text("2")
    git_state.cache_clear()
    assert git_state(tmp_path) == (commit, True)
    git_state.cache_clear()


def test_dataset_inputs_name_count_and_digest_the_sample_lists(tmp_path):
    import hashlib
    import json

    from kdseg.tracking.fields import dataset_inputs

    class Listed:  # what dataset_inputs reads of a SegmentationDataset
        def __init__(self, samples, skipped):
            self.samples, self.skipped = samples, skipped

        def __len__(self):
            return len(self.samples)

    root = tmp_path / "data"
    train = Listed([(root / "JPEGImages/a.jpg", root / "Seg/a.png"), (root / "JPEGImages/b.jpg", root / "Seg/b.png")], [1])
    val = Listed([(root / "JPEGImages/c.jpg", root / "Seg/c.png")], [])
    cfg = {"name": "voc", "root": str(root), "train_list": "ImageSets/train.txt", "val_list": "ImageSets/val.txt", "tune_fraction": None}
    (tr, tr_ctx), (va, va_ctx) = dataset_inputs(cfg, (train, val))
    assert (tr["name"], tr_ctx, va["name"], va_ctx) == ("voc/train", "training", "voc/val", "validation")
    listing = "JPEGImages/a.jpg\nSeg/a.png\nJPEGImages/b.jpg\nSeg/b.png"
    assert tr["digest"] == hashlib.sha1(listing.encode()).hexdigest()[:16] != va["digest"]
    assert json.loads(tr["profile"]) == {"num_samples": 2, "skipped": 1}
    assert json.loads(va["source"]) == {"root": str(root), "split": "ImageSets/val.txt"}
    tuned = dataset_inputs(cfg | {"tune_fraction": 0.2, "tune_seed": 3, "generated": True, "num_train": 2, "num_val": 1,
                                  "image_size": 64, "seed": 0}, (train, val))
    assert [(f["name"], c) for f, c in tuned] == [("voc/tune-train", "training"), ("voc/tune-val", "tuning")]
    assert json.loads(tuned[1][0]["source"]) == {"root": str(root), "split": "ImageSets/train.txt", "tune_fraction": 0.2, "tune_seed": 3}
    assert json.loads(tuned[0][0]["profile"])["generator"] == {"num_train": 2, "num_val": 1, "image_size": 64, "seed": 0}


def test_description_says_what_was_trained_and_how_it_did():
    from kdseg.tracking.fields import describe

    text = describe("distill", "resnet18", "resnet101", {"pi": 100.0, "pa": 1.0}, "synthetic", 2,
                    {"final_miou": 0.19712, "best_miou": 0.2101}, "/runs/3", ["seed=2", "loss=pi_pa"])
    assert text.startswith("**distill** `resnet18` from teacher `resnet101`")
    assert "terms: `pi` × 100, `pa` × 1" in text and "data: `synthetic`, seed 2" in text
    assert "final val mIoU **19.71%**, best 21.01%" in text and "`seed=2 loss=pi_pa`" in text and "`/runs/3`" in text
    assert "none (cross-entropy only)" in describe("distill", "resnet18", None, {}, "synthetic", 0)


def test_ui_hint_opens_the_runs_page_on_the_classic_view(session_dir):
    uri = f"sqlite:///{session_dir}/mlflow.db"
    tracker = Tracker(uri, "tracking-test")
    with tracker.run("hint", {}, {}) as run_id:
        hint = tracker.ui_hint()
    assert f"mlflow ui --backend-store-uri {uri}" in hint
    assert hint.endswith(f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}?workflowType=machine_learning")
    tracker.tracking_uri = "http://mlflow.lab:5000/"
    assert tracker.ui_hint().endswith(f"http://mlflow.lab:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}?workflowType=machine_learning")
    assert Tracker("", "x", enabled=False).ui_hint() == ""


def test_run_names_of_a_sweep_carry_its_other_swept_values(monkeypatch):
    import kdseg.tasks.distill as distill

    monkeypatch.setattr(distill, "swept_keys", lambda: [])
    assert distill.run_name("resnet18", "pi+pa", 0, []) == "resnet18 pi+pa seed0"
    monkeypatch.setattr(distill, "swept_keys", lambda: ["seed", "loss", "trainer.base_lr", "loss.terms.kd.temperature"])
    overrides = ["seed=1", "loss=kd", "trainer.base_lr=0.02", "loss.terms.kd.temperature=4", "trainer=smoke"]
    assert distill.run_name("resnet18", "kd", 1, overrides) == "resnet18 kd base_lr=0.02 kd.temperature=4 seed1"
