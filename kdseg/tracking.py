"""MLflow tracking: one run per training job, with flattened params, tags, metrics and artifacts."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out |= flatten(value, name) if isinstance(value, dict) and value else {name: value}
    return out


def git_commit(path: str | os.PathLike = ".") -> str:
    """The current commit of the repository at ``path`` (``unknown`` outside git)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """A thin wrapper over ``MlflowClient`` that does nothing when tracking is disabled."""

    def __init__(self, tracking_uri: str, experiment_name: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        if not enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        try:
            self.experiment_id = self._experiment_id(experiment_name)
        except mlflow.exceptions.MlflowException as err:
            raise RuntimeError(f"MLflow tracking store '{tracking_uri}' is not usable: {err}") from err

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, creating it if needed; safe when parallel jobs create it at once."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id  # another job created it first

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Tracker":
        """The configured tracker; disabled on DDP ranks > 0 (rank 0 logs for all)."""
        from kdseg.dist import is_main

        return cls(cfg.logger.tracking_uri, cfg.logger.experiment_name, cfg.logger.enabled and is_main())

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Create the run, log params and tags; returns the run id."""
        if not self.enabled:
            return None
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    @contextmanager
    def run(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[str | None]:
        """``start`` ... ``end``: the run ends FINISHED, or FAILED if the body raises."""
        run_id = self.start(run_name, params, tags)
        try:
            yield run_id
        except BaseException:
            self.end("FAILED")
            raise
        self.end()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled and self.run_id:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status)


def run_params(cfg: DictConfig) -> dict[str, Any]:
    """Flattened, resolved config without Hydra's own keys, and the number of DDP processes.

    ``dist.world_size`` is a param (not a tag) because the global batch depends on it:
    runs with different world sizes are different settings in a sweep summary.
    """
    from kdseg.dist import world_size

    return flatten(OmegaConf.to_container(cfg, resolve=True)) | {"dist.world_size": world_size()}
