"""Shared fixtures: configs composed with Hydra's compose API at smoke size; the ``gpu`` marker.

The generated dataset, the cached smoke teacher and the MLflow store live in one
session folder, so tests share them the way repeated runs of a user do.

Layout: ``tests/unit/`` mirrors the package (one file per module, ``unit/data/`` and
``unit/losses/`` for its subpackages); ``tests/e2e/`` runs whole jobs through
``kdseg.tasks.run``, ``run.py`` or subprocesses (torchrun, multiruns, launchers).
Markers (setup.cfg): ``slow`` (deselected by default; ``pytest -m slow`` runs them), ``ddp``
(several processes; every ddp test is slow too) and ``gpu`` (skipped, and reported as
skipped, where CUDA is missing).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from .real_layouts import Written, write_dataset

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
SMOKE = [
    "trainer=smoke", "dataset.num_train=16", "dataset.num_val=8", "dataset.image_size=64", "speed.repeats=2", "speed.warmup=1",
    "logger.log_checkpoints=none",  # each test run's checkpoints stay in its folder, not copied into MLflow (disk)
]


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: every collected test is seen
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA: skipped (and listed as skipped by ``-ra``) where there is none.
    A ``ddp`` test must be ``slow`` too, or neither CI run (default, ``-m slow``) would select it."""
    unslowed = [item.nodeid for item in items if "ddp" in item.keywords and "slow" not in item.keywords]
    if unslowed:
        raise pytest.UsageError(f"ddp tests must also be marked slow: {', '.join(unslowed)}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kdseg")


@pytest.fixture
def make_cfg(session_dir: Path, tmp_path: Path):
    """``make_cfg(*overrides)``: a smoke-size config whose run folder is this test's tmp_path."""

    def make(*overrides: str, smoke: bool = True) -> DictConfig:
        paths = [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path}/out",
            f"paths.data_dir={session_dir}/data",
            f"paths.cache_dir={session_dir}/cache",
            f"logger.tracking_uri=sqlite:///{session_dir}/mlflow.db",
        ]
        return compose_config(paths + (SMOKE if smoke else []) + list(overrides))

    return make


FOLDERS = {"cityscapes": "cityscapes", "ade20k": "ADEChallengeData2016", "camvid": "CamVid"}
"""The split-folder datasets and the name of the folder they are released in."""


@pytest.fixture(params=list(FOLDERS))
def written(request, tmp_path: Path) -> Written:
    """A small Cityscapes, ADE20K or CamVid folder in its real layout (tests/real_layouts.py)."""
    return write_dataset(request.param, tmp_path / FOLDERS[request.param])
