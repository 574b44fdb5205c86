"""Runs against an unreliable MLflow store: unreachable at the start (one error), down mid-run (nothing lost)."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from kdseg.tracking import HTTP_DEFAULTS, Tracker

from ..flaky_store import FlakyStore, steps

# ------------------------------------------------------------------- an unreliable store


def test_unreachable_store_is_a_clear_error_before_training(make_cfg, tmp_path, monkeypatch):
    from kdseg.errors import TrackingError
    from kdseg.tasks import run

    for key, value in HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    cfg = make_cfg("logger.tracking_uri=http://127.0.0.1:9")
    with pytest.raises(TrackingError, match=r"MLflow tracking store 'http://127\.0\.0\.1:9' is not reachable .*logger=none"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_training_survives_an_outage_and_every_metric_arrives(make_cfg, monkeypatch, capsys):
    from kdseg.tasks import run

    store = FlakyStore(monkeypatch)
    original = Tracker.log_metrics

    def log_metrics(self, metrics, step):
        store.down = step == 1 and "train/loss" in metrics  # the store is down while epoch 1 is logged
        original(self, metrics, step)
        store.down = False

    monkeypatch.setattr(Tracker, "log_metrics", log_metrics)
    cfg = make_cfg("loss=none", "trainer.max_iters=null", "trainer.epochs=2", "dataset.num_train=8",
                   "logger.run_name=outage-e2e", "logger.retry_wait_s=0")
    run(cfg)
    assert "kept in" in capsys.readouterr().out
    client = MlflowClient(cfg.logger.tracking_uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("kdseg").experiment_id], "attributes.run_name = 'outage-e2e'")
    assert steps(cfg.logger.tracking_uri, mrun.info.run_id, "train/loss") == [1, 2]
    assert mrun.info.status == "FINISHED"
