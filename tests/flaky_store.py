"""An MLflow store that fails on demand, for the tracking tests."""
from __future__ import annotations

from mlflow.tracking import MlflowClient


class FlakyStore:
    """Makes ``MlflowClient.log_batch`` fail while ``down`` is true (or for the next ``fail_next`` calls)."""

    def __init__(self, monkeypatch):
        self.down, self.fail_next, self.calls = False, 0, 0
        original = MlflowClient.log_batch

        def log_batch(client, *args, **kwargs):
            self.calls += 1
            if self.down or self.fail_next > 0:
                self.fail_next -= 1
                raise ConnectionError("store unavailable")
            return original(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


def steps(uri: str, run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` was logged to a run."""
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))
