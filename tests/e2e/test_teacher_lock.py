"""The teacher cache under concurrency: two jobs started at once train the teacher once.

Both tests start from an empty cache and an empty MLflow store, so the jobs also race
to create the store and the built-in dataset.
"""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdseg.data import build_datasets
from kdseg.job import build
from kdseg.teacher import cache_path as teacher_cache_path
from kdseg.teacher import get_teacher

from ..conftest import ROOT, SMOKE, compose_config

TRAINING = "no cached teacher at"


def overrides(root: Path) -> list[str]:
    return [f"paths.root_dir={root}", f"paths.data_dir={root}/data", f"paths.cache_dir={root}/cache",
            f"logger.tracking_uri=sqlite:///{root}/mlflow.db", *SMOKE]


def teacher_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("kdseg").experiment_id], "tags.task = 'teacher'")


def _job(root: Path, barrier, log: Path) -> None:
    """One spawned job: wait for the other, then get the teacher (training it if missing)."""
    sys.stdout = open(log, "w", buffering=1)
    cfg = compose_config([*overrides(root), f"paths.output_dir={log.with_suffix('')}"])
    barrier.wait()
    get_teacher(cfg, build_datasets(cfg.dataset), build(cfg.teacher.model), torch.device("cpu"))


def test_two_spawned_jobs_train_the_teacher_once(tmp_path):
    # spawn, not fork: a child forked after torch has started its thread pool can deadlock
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    jobs = [context.Process(target=_job, args=(tmp_path, barrier, log)) for log in logs]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(1800)
    assert [job.exitcode for job in jobs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert sum(log.read_text().count(TRAINING) for log in logs) == 1
    assert teacher_cache_path(compose_config([*overrides(tmp_path), "paths.output_dir=unused"])).is_file()
    assert len(teacher_runs(tmp_path)) == 1


@pytest.mark.slow
def test_two_main_jobs_started_at_once_train_the_teacher_once(tmp_path):
    """Two ``python run.py`` processes (the main job) launched together."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *overrides(tmp_path), f"seed={seed}", f"hydra.run.dir={tmp_path}/run{seed}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for seed in (0, 1)
    ]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [out[-3000:] for out in outputs]
    assert sum(out.count(TRAINING) for out in outputs) == 1
    assert len(teacher_runs(tmp_path)) == 1
