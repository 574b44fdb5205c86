"""Resuming interrupted runs: which run folder and checkpoint to continue (the RNG state is :mod:`kdseg.runtime`'s).

A run folder holds ``run.json`` (``run_uid``, config ``fingerprint``, ``status``: running,
failed, interrupted (by SIGTERM / SIGUSR1, after a checkpoint of its position) or finished,
and the MLflow run id) next to its checkpoints. ``last.pt`` is written
after every epoch; the one it replaces is kept as ``last.prev.pt``, so a damaged ``last.pt``
still leaves a good checkpoint one epoch older.

``trainer.resume``:

- ``auto`` continues the unfinished run of the same config (same fingerprint): the run in
  this run's own folder (a relaunch with the same ``hydra.run.dir``, or a requeued job),
  else the latest run of this config recorded under ``<paths.cache_dir>/runs/``. The run
  continues in its original folder and MLflow run. Without one, the run starts afresh.
- ``off`` always starts afresh (in this run's folder).
- a path to a checkpoint or a run folder continues from there, even with a changed config
  (the changed keys are printed).
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from kdseg import dist
from kdseg.checkpoint import load_checkpoint, previous_path
from kdseg.errors import CheckpointError, ResumeError, TrainingInterrupted
from kdseg.utils import digest, flatten, is_setting

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
LAST = "last.pt"
NOT_FINGERPRINTED = ("paths.output_dir", "trainer.resume", "trainer.progress")
"""Keys that do not change what a run computes, so they may differ when it is resumed."""
FINGERPRINT_CHARS = 16
"""Hex digits of a run's config fingerprint: names the run in ``<paths.cache_dir>/runs/<fingerprint>.json``
(64 bits: no two configs of one user's cache collide by chance)."""


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The flattened, resolved config that identifies a run (without ``NOT_FINGERPRINTED``)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {key: value for key, value in flat.items() if key not in NOT_FINGERPRINTED and is_setting(key)}


def fingerprint(config: dict[str, Any]) -> str:
    """A short hash of a :func:`run_config` (or any JSON-able key)."""
    return digest(config, FINGERPRINT_CHARS)


# ------------------------------------------------------------------------------ run folder


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_run(out_dir: Path) -> dict | None:
    """The folder's ``run.json``, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((out_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def update_run(out_dir: Path, **fields: Any) -> None:
    """Merge ``fields`` into the folder's ``run.json`` (written atomically)."""
    _write_json(out_dir / RUN_FILE, (read_run(out_dir) or {}) | fields)


def _try_lock(out_dir: Path) -> FileLock | None:
    """The folder's run lock, acquired without waiting; None while a live process holds it."""
    lock = FileLock(out_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def in_use(out_dir: Path) -> bool:
    """Whether a live process holds the folder's run lock (a killed one releases it)."""
    if not (out_dir / LOCK_FILE).exists():
        return False
    lock = _try_lock(out_dir)
    if lock is None:
        return True
    lock.release()
    return False


def index_file(cache_dir: str | os.PathLike, fp: str) -> Path:
    return Path(cache_dir) / "runs" / f"{fp}.json"


# ------------------------------------------------------------------------------ planning


@dataclass
class Plan:
    """Where a run writes and, when it resumes, the checkpoint it continues from."""

    out_dir: Path
    config: dict[str, Any]
    run_uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    checkpoint: dict | None = None
    checkpoint_path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config)

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    @property
    def mlflow_run_id(self) -> str | None:
        return (self.checkpoint or {}).get("mlflow_run_id")

    def start(self, task: str, cache_dir: str | os.PathLike | None = None) -> None:
        """Mark the folder as holding a running run of this config (and index it by fingerprint)."""
        update_run(self.out_dir, run_uid=self.run_uid, fingerprint=self.fingerprint, status="running", task=task)
        if cache_dir is not None and not self.resuming:
            _write_json(index_file(cache_dir, self.fingerprint), {"output_dir": str(self.out_dir.resolve())})

    def finish(self, status: str = "finished") -> None:
        """Record how the run ended; on a full disk only a warning (the run's own error is what counts)."""
        try:
            update_run(self.out_dir, status=status)
        except OSError as err:
            print(f"warning: could not mark {self.out_dir / RUN_FILE} {status} ({err.strerror or err})", flush=True)

    @contextmanager
    def active(self, task: str, cache_dir: str | os.PathLike | None = None) -> Iterator[None]:
        """``start`` ... ``finish`` holding the folder's run lock; the status ends ``finished``, ``interrupted``
        if the body stops on a signal (:class:`TrainingInterrupted`), or ``failed`` if it raises anything else."""
        if not dist.is_main():  # DDP: rank 0 holds the lock and writes run.json for all ranks
            yield
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(self.out_dir)
        if lock is None:
            raise ResumeError(f"'{self.out_dir}' is in use by another running kdseg process")
        try:
            self.start(task, cache_dir)
            try:
                yield
            except TrainingInterrupted:
                self.finish("interrupted")
                raise
            except BaseException:
                self.finish("failed")
                raise
            self.finish()
        finally:
            lock.release()


def _candidates(path: Path) -> list[Path]:
    """A run folder -> its last and previous checkpoints; a file -> itself (and its previous, if kept)."""
    if path.is_dir():
        return [path / LAST, previous_path(path / LAST)]
    return [path, previous_path(path)] if path.name == LAST else [path]


def load_resumable(paths: list[Path], run_uid: str | None = None, say=print) -> tuple[dict, Path] | None:
    """The first of ``paths`` that is a readable checkpoint with a training state (of ``run_uid``).

    A damaged candidate is reported and the next one tried; one of another run (an earlier
    run in the same folder) is passed over. None if there is nothing of this run to resume;
    if there is but none of it is usable, the error says what was wrong with each.
    """
    problems = []
    for path in paths:
        if not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            say(f"warning: {err}")
            continue
        if "rng" not in ckpt or "epoch" not in ckpt:
            problems.append(f"'{path}' holds weights only, not a training state to resume")
        elif run_uid is None or ckpt.get("run_uid") == run_uid:
            if problems:
                say(f"resuming from the previous checkpoint '{path}' (epoch {ckpt['epoch']}) instead")
            return ckpt, path
    if not problems:
        return None
    raise ResumeError(f"cannot resume: {'; '.join(problems)}. Start afresh with trainer.resume=off")


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def plan_run(
    mode: str,
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    cache_dir: str | os.PathLike | None = None,
    say=print,
) -> Plan:
    """Decide, for ``trainer.resume=mode``, where the run writes and what it resumes from.

    ``config`` is the run's :func:`run_config` (its fingerprint names the run); ``cache_dir``
    holds the index that finds an interrupted run of the same config in another folder.
    """
    out_dir, fp = Path(out_dir), fingerprint(config)
    if mode == "off":
        return Plan(out_dir, config)
    if mode != "auto":
        path = Path(mode)
        if not path.exists():
            raise ResumeError(f"trainer.resume='{mode}': no such checkpoint or run folder")
        found = load_resumable(_candidates(path), say=say)
        if found is None:
            raise ResumeError(f"trainer.resume='{mode}' is a folder without {LAST} or {previous_path(LAST).name}: "
                              f"expected a checkpoint file or a run folder holding {LAST}")
        ckpt, used = found
        changed = changed_keys(ckpt.get("config", {}), config)
        if changed:
            say(f"note: resuming '{used}' with a changed config: {', '.join(changed)}")
        return Plan(used.parent, config, ckpt.get("run_uid", uuid.uuid4().hex), ckpt, used)
    folders = [out_dir]
    if cache_dir is not None:
        try:
            indexed = Path(json.loads(index_file(cache_dir, fp).read_text())["output_dir"])
        except (OSError, ValueError, KeyError):
            indexed = None
        if indexed is not None and indexed.resolve() != out_dir.resolve():
            folders.append(indexed)
    for folder in folders:
        info = read_run(folder)
        if not info or info.get("status") == "finished":
            continue
        if in_use(folder):
            if folder == out_dir:
                raise ResumeError(f"'{folder}' is in use by another running kdseg process")
            say(f"note: the run of this config in '{folder}' is still running; starting a new run")
            continue
        if info.get("fingerprint") != fp:
            if folder == out_dir and any(p.exists() for p in _candidates(folder)):
                raise ResumeError(
                    f"'{folder}' holds an unfinished run of another config; continue it with "
                    f"trainer.resume={folder}, overwrite it with trainer.resume=off, or use another hydra.run.dir"
                )
            continue
        found = load_resumable(_candidates(folder), info.get("run_uid"), say=say)
        if found is not None:  # else: stopped before its first checkpoint, nothing to resume
            return Plan(folder, config, info["run_uid"], *found)
    return Plan(out_dir, config)
