"""MLflow tracking wrapper: flattened params and run status on success and failure."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from kdseg.tracking import Tracker, flatten


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
