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

    from kdseg.tracking import main as send_pending

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
