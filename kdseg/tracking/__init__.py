"""MLflow tracking: one run per training job, with flattened params, tags, metrics and artifacts.

Reliability: the store is probed when the tracker is made (an unreachable store is a
one-line :class:`~kdseg.errors.TrackingError` before any training); every later call is
retried, and what still cannot be sent (metrics, artifacts, the final status) is kept in
memory and in the run folder's ``mlflow_pending.jsonl``, sent with the next call that gets
through, at the end of the run, when the run is resumed, or by hand with
``python -m kdseg.tracking <run folder>/mlflow_pending.jsonl``.

MLflow itself is imported where it is first used, not at the top: importing it takes seconds,
which ``logger=none`` runs (and every module that only needs :func:`run_params`) need not pay.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from kdseg.errors import TrackingError, TrainingInterrupted, one_line
from kdseg.tracking.fields import DESCRIPTION_TAG, select_params
from kdseg.utils import flatten

PENDING_FILE = "mlflow_pending.jsonl"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""For a tracking server: kdseg retries itself (with waits), so MLflow's own retries are off."""
METRICS_PER_BATCH = 1000
"""MLflow's limit on the metrics of one ``log_batch`` call."""
PARAMS_PER_BATCH = 100
"""MLflow's limit on the params of one ``log_batch`` call."""
PARAM_VALUE_CHARS = 6000
"""MLflow's limit on the length of a param value (longer ones, e.g. a list of scales, are cut)."""
WARNING_CHARS = 200
"""How much of a store's error message a retry / fallback warning quotes (one line of output)."""
ERROR_CHARS = 300
"""How much of a store's error message the one-line error that stops a run quotes."""
UI_ADDRESS = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` serves by default."""
SYSTEM_METRICS_INTERVAL_S = 10
"""Seconds between samples of ``logger.system_metrics`` (MLflow's CPU, memory, disk, network and GPU monitor)."""


def _store_lock(tracking_uri: str):
    """A file lock around creating a SQLite store, so parallel jobs do not race its schema setup."""
    if not tracking_uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock")


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store's file.

    (MLflow's default for database stores is ``./mlruns`` of whatever directory the first
    job runs in, so checkpoints of a store kept elsewhere would land in that directory.)
    Other stores (a server, a folder) keep MLflow's default.
    """
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


class Tracker:
    """A thin wrapper over ``MlflowClient`` that does nothing when tracking is disabled."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        enabled: bool = True,
        retries: int = 3,
        retry_wait_s: float = 2.0,
        system_metrics: bool = False,
    ) -> None:
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.system_metrics = system_metrics
        self.monitor: Any = None
        self.run_id: str | None = None
        self.pending: list[dict] = []
        self.pending_file: Path | None = None
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            logging.getLogger(name).setLevel(logging.WARNING)
        if tracking_uri.startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        try:
            with _store_lock(tracking_uri):
                self.client = MlflowClient(tracking_uri)
                self.experiment_id = self._experiment_id(experiment_name)
        except Exception as err:  # MlflowException, connection and database errors alike
            raise TrackingError(
                f"MLflow tracking store '{tracking_uri}' is not reachable ({one_line(err)[:ERROR_CHARS]}); start it, "
                "point logger.tracking_uri (or MLFLOW_TRACKING_URI) at a working store, or run with logger=none"
            ) from err

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, creating it if needed; safe when parallel jobs create it at once."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.tracking_uri))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id  # another job created it first

    @classmethod
    def from_config(cls, logger: DictConfig, enabled: bool = True) -> "Tracker":
        """The tracker of the ``logger`` config; ``enabled=False`` turns it off whatever the config says
        (the caller's decision, e.g. on DDP ranks > 0, for which rank 0 logs)."""
        return cls(logger.tracking_uri, logger.experiment_name, logger.enabled and enabled, logger.retries, logger.retry_wait_s,
                   logger.get("system_metrics", False))

    # -------------------------------------------------------------------- calls with retries

    def _call(self, what: str, fn: Callable, *args: Any, retries: int | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried with doubling waits; the last failure is raised."""
        retries = self.retries if retries is None else retries
        wait = self.retry_wait_s
        for attempt in range(retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if attempt == retries:
                    raise
                print(f"warning: MLflow {what} failed ({one_line(err)[:WARNING_CHARS]}); retry {attempt + 1}/{retries} in {wait:g}s", flush=True)
                time.sleep(wait)
                wait *= 2

    def _send(self, op: dict, retries: int | None = None) -> None:
        """Perform one recorded operation on the store."""
        from mlflow.entities import Metric

        run_id = op["run_id"]
        if op["op"] == "metrics":
            batch = [Metric(k, float(v), op["timestamp"], op["step"]) for k, v in op["metrics"].items()]
            for i in range(0, len(batch), METRICS_PER_BATCH):
                self._call("log_metrics", self.client.log_batch, run_id, metrics=batch[i : i + METRICS_PER_BATCH], retries=retries)
        elif op["op"] == "artifact":
            self._call("log_artifact", self.client.log_artifact, run_id, op["path"], op["artifact_path"], retries=retries)
        elif op["op"] == "terminate":
            self._call("set_terminated", self.client.set_terminated, run_id, op["status"], retries=retries)

    def _do(self, op: dict) -> None:
        """Send earlier unsent operations, then ``op``; keep ``op`` for later if the store is down."""
        if self.pending and not self.flush(retries=0):
            self._keep(op, None)
            return
        try:
            self._send(op)
        except Exception as err:
            self._keep(op, err)

    def _keep(self, op: dict, err: Exception | None) -> None:
        self.pending.append(op)
        if self.pending_file is not None:
            try:
                self.pending_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.pending_file, "a") as f:
                    f.write(json.dumps(op | {"tracking_uri": self.tracking_uri}) + "\n")
            except OSError as write_err:  # a full disk: kept in memory only
                print(f"warning: {self.pending_file} not written ({write_err.strerror or write_err})", flush=True)
        if err is not None:
            where = f"kept in {self.pending_file}" if self.pending_file else "kept in memory"
            print(f"warning: MLflow is unreachable ({one_line(err)[:WARNING_CHARS]}); {op['op']} {where}, sent when it is back", flush=True)

    def flush(self, retries: int | None = None) -> bool:
        """Send the operations kept while the store was down; True when none are left."""
        while self.pending:
            try:
                self._send(self.pending[0], retries=retries)
            except Exception:
                break
            self.pending.pop(0)
            self._rewrite_pending_file()
        return not self.pending

    def _rewrite_pending_file(self) -> None:
        if self.pending_file is None:
            return
        if not self.pending:
            self.pending_file.unlink(missing_ok=True)
            return
        tmp = self.pending_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(op | {"tracking_uri": self.tracking_uri}) + "\n" for op in self.pending))
        os.replace(tmp, self.pending_file)

    # -------------------------------------------------------------------- run lifecycle

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        run_id: str | None = None,
        run_dir: str | os.PathLike | None = None,
    ) -> str | None:
        """Create the run (or reopen ``run_id`` to continue it), log params and tags; returns the run id.

        ``run_dir`` is where operations that cannot be sent are kept (``mlflow_pending.jsonl``);
        ones left there by an earlier process of this run are sent first.
        """
        if not self.enabled:
            return None
        from mlflow.entities import Param

        if run_dir is not None:
            self.pending_file = Path(run_dir) / PENDING_FILE
            if self.pending_file.is_file():
                self.pending = [json.loads(line) for line in self.pending_file.read_text().splitlines() if line.strip()]
                print(f"sending {len(self.pending)} MLflow operation(s) kept from an earlier attempt", flush=True)
                self.flush()
        tags = {k: str(v) for k, v in tags.items()}
        if run_id is not None:
            try:
                self._call("get_run", self.client.get_run, run_id)
            except Exception as err:
                print(f"warning: cannot reopen MLflow run {run_id} ({one_line(err)[:WARNING_CHARS]}); starting a new one", flush=True)
                tags["resumed_from"] = run_id
            else:
                self.run_id = run_id
                try:
                    self._call("update_run", self.client.update_run, run_id, status="RUNNING")
                except Exception as err:
                    print(f"warning: MLflow run {run_id} not marked RUNNING again ({one_line(err)[:WARNING_CHARS]})", flush=True)
                self.set_tags(tags)
                self._start_monitor(resumed=True)
                return run_id
        try:
            run = self._call("create_run", self.client.create_run, self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            items = [Param(k, str(v)[:PARAM_VALUE_CHARS]) for k, v in params.items()]
            for i in range(0, len(items), PARAMS_PER_BATCH):
                self._call("log_params", self.client.log_batch, self.run_id, params=items[i : i + PARAMS_PER_BATCH])
        except Exception as err:
            raise TrackingError(f"MLflow tracking store '{self.tracking_uri}' failed to create the run ({one_line(err)[:ERROR_CHARS]})") from err
        self._start_monitor(resumed=False)
        return self.run_id

    def _start_monitor(self, resumed: bool) -> None:
        """With ``logger.system_metrics``: MLflow's system monitor samples this machine into the run."""
        if not self.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                                resume_logging=resumed, tracking_uri=self.tracking_uri)
            self.monitor.start()
        except Exception as err:
            self.monitor = None
            print(f"warning: MLflow system metrics not started ({one_line(err)[:WARNING_CHARS]})", flush=True)

    @contextmanager
    def run(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        run_id: str | None = None,
        run_dir: str | os.PathLike | None = None,
    ) -> Iterator[str | None]:
        """``start`` ... ``end``: the run ends FINISHED, KILLED if the body stops on a signal
        (:class:`TrainingInterrupted`), or FAILED if it raises anything else."""
        run_id = self.start(run_name, params, tags, run_id, run_dir)
        try:
            yield run_id
        except TrainingInterrupted:
            self.end("KILLED")
            raise
        except BaseException:
            self.end("FAILED")
            raise
        self.end()

    def log_metrics(self, metrics: dict[str, float], step: int, run_id: str | None = None) -> None:
        """``metrics`` at ``step`` of this run (or of ``run_id``: a sweep's parent logs its children's summary)."""
        if not self.enabled or (run_id or self.run_id) is None:
            return
        now = int(time.time() * 1000)
        self._do({"op": "metrics", "run_id": run_id or self.run_id, "step": step, "timestamp": now,
                  "metrics": {k: float(v) for k, v in metrics.items()}})

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which ``key`` is already in the store (empty if it cannot be asked)."""
        if not self.enabled or self.run_id is None:
            return set()
        try:
            history = self._call("get_metric_history", self.client.get_metric_history, self.run_id, key)
        except Exception:
            return set()
        return {m.step for m in history}

    def find_run(self, run_id: str) -> Any | None:
        """The run ``run_id`` of this store (an MLflow ``Run``), or None if the store does not hold it."""
        if not self.enabled:
            return None
        try:
            return self._call("get_run", self.client.get_run, run_id, retries=0)
        except Exception:
            return None

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled and self.run_id:
            for key, value in tags.items():
                try:
                    self._call("set_tag", self.client.set_tag, self.run_id, key, str(value))
                except Exception as err:
                    print(f"warning: MLflow tag {key} not set ({one_line(err)[:WARNING_CHARS]})", flush=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id and Path(path).exists():
            self._do({"op": "artifact", "run_id": self.run_id, "path": str(path), "artifact_path": artifact_path})

    def log_inputs(self, inputs: list[tuple[dict[str, str], str]]) -> None:
        """MLflow dataset inputs, ``(fields of mlflow.entities.Dataset, context)`` each (see
        :func:`kdseg.tracking.fields.dataset_inputs`); a store that refuses them is a warning."""
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        found = [DatasetInput(Dataset(**fields), [InputTag("mlflow.data.context", context)]) for fields, context in inputs]
        try:
            self._call("log_inputs", self.client.log_inputs, self.run_id, datasets=found)
        except Exception as err:
            print(f"warning: MLflow dataset inputs not logged ({one_line(err)[:WARNING_CHARS]})", flush=True)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """A table (column -> values) as a JSON artifact MLflow shows as a table; a refusal is a warning."""
        if not (self.enabled and self.run_id):
            return
        try:
            self._call("log_table", self.client.log_table, self.run_id, data, artifact_file)
        except Exception as err:
            print(f"warning: MLflow table {artifact_file} not logged ({one_line(err)[:WARNING_CHARS]})", flush=True)

    def ui_hint(self, run_id: str | None = None) -> str:
        """Where to look at a run (default: this one) in MLflow's UI: the command that serves a local
        store, and the run's page, opened on the classic runs view (``workflowType=machine_learning``;
        MLflow 3 otherwise opens an experiment on its GenAI pages)."""
        run_id = run_id or self.run_id
        if not (self.enabled and run_id):
            return ""
        if self.tracking_uri.startswith(("http://", "https://")):
            base, serve = self.tracking_uri.rstrip("/"), ""
        else:
            base, serve = UI_ADDRESS, f"mlflow ui --backend-store-uri {self.tracking_uri}\n  then open "
        return (f"MLflow run {run_id} in {self.tracking_uri}\nbrowse: {serve}"
                f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}?workflowType=machine_learning")

    def describe(self, markdown: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content``)."""
        self.set_tags({DESCRIPTION_TAG: markdown})

    def log_model(self, model: Any, example: Any, name: str, pip_requirements: list[str]) -> str | None:
        """``model`` (on the CPU, in eval mode) as an MLflow PyTorch model named ``name`` of this run, with
        the signature and input example of ``example`` (a numpy batch); its URI (``runs:/<id>/<name>``),
        or None (with a warning) where the store refuses it. Saved with pickle (the classes it names,
        smp's, must be importable where it is loaded)."""
        if not (self.enabled and self.run_id):
            return None
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        previous_uri, previous_experiment = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_EXPERIMENT_ID")
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its warning about pickle: said in the docstring and docs
        try:
            mlflow.set_tracking_uri(self.tracking_uri)
            os.environ["MLFLOW_EXPERIMENT_ID"] = self.experiment_id  # the logged model belongs to the run's experiment
            self._call("log_model", mlflow.pytorch.log_model, model, name=name, run_id=self.run_id,
                       signature=infer_signature(example, output), input_example=example,
                       pip_requirements=pip_requirements, serialization_format="pickle")
        except Exception as err:
            print(f"warning: MLflow model {name} not logged ({one_line(err)[:WARNING_CHARS]})", flush=True)
            return None
        finally:
            mlflow.set_tracking_uri(previous_uri)
            if previous_experiment is None:
                os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            else:
                os.environ["MLFLOW_EXPERIMENT_ID"] = previous_experiment
        return f"runs:/{self.run_id}/{name}"

    def end(self, status: str = "FINISHED") -> None:
        if not (self.enabled and self.run_id):
            return
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as err:
                print(f"warning: MLflow system metrics not finished ({one_line(err)[:WARNING_CHARS]})", flush=True)
            self.monitor = None
        self._do({"op": "terminate", "run_id": self.run_id, "status": status})
        if self.pending and not self.flush():
            where = f"kept in {self.pending_file}" if self.pending_file else "lost: no run folder to keep them in"
            hint = f"; send them with: python -m kdseg.tracking {self.pending_file}" if self.pending_file else ""
            print(f"warning: {len(self.pending)} MLflow operation(s) of run {self.run_id} could not be sent, {where}{hint}", flush=True)


def run_params(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """Flattened, resolved config without what is not a setting (a loss option's search space), plumbing
    (``_target_``, ``logger.*``, ``paths.*``) and options of inactive terms
    (:func:`~kdseg.tracking.fields.select_params`), and the number of DDP processes.

    ``dist.world_size`` is a param (not a tag) because the global batch depends on it:
    runs with different world sizes are different settings in a sweep summary.
    """
    return select_params(flatten(OmegaConf.to_container(cfg, resolve=True))) | {"dist.world_size": world_size}


def replay(pending_file: str | os.PathLike) -> int:
    """Send the operations kept in a ``mlflow_pending.jsonl``; returns how many are still unsent."""
    path = Path(pending_file)
    ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not ops:
        path.unlink()
        return 0
    tracker = Tracker(ops[0]["tracking_uri"], "Default", retries=3, retry_wait_s=2.0)
    tracker.pending, tracker.pending_file = ops, path
    tracker.flush()
    return len(tracker.pending)
