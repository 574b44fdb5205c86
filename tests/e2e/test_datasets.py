"""Cityscapes and ADE20K through runs: the dataset's class names in metrics, tables, figures; a teacher needed.

Each test writes a small folder in the dataset's real layout (odd image sizes, stored mask
values including the ignored ones) and checks the reader against label maps computed by hand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import kdseg.figure
import kdseg.tasks.distill
from kdseg.data.classes import dataset_classes
from kdseg.errors import ConfigError
from kdseg.figure import qualitative_figure
from kdseg.tasks import run
from kdseg.viz import save_prediction_grid

from ..real_layouts import FIRST_CLASS, Written


def dataset_cfg(make_cfg, data: Written, *overrides: str):
    """The composed config for ``data`` at 64 px crops (trainer=smoke), its speed measured at 64 x 64."""
    sizes = ("dataset.base_size=64", "dataset.crop_size=64", "dataset.eval_size=[64,64]", "speed.repeats=2", "speed.warmup=1",
             "logger.log_checkpoints=none")
    return make_cfg("trainer=smoke", f"dataset={data.name}", f"dataset.root={data.root}", *sizes, *overrides, smoke=False)


BAD_VALUES = {"cityscapes": (34, 40), "ade20k": (151, 200)}  # not a labelId / above 150
EXPECTED = {"cityscapes": "Cityscapes labelIds 0..33", "ade20k": "ADE20K labels 0..150"}


# --- runs -------------------------------------------------------------------------------


def mlflow_run(cfg, run_name: str, dataset: str):
    client = MlflowClient(cfg.logger.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment_name)
    query = f"attributes.run_name = '{run_name}' and tags.dataset = '{dataset}'"
    (found, *_) = client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"])
    return found


def test_baseline_run_logs_the_dataset_class_names(written, make_cfg, tmp_path: Path, monkeypatch) -> None:
    palettes = []

    def save_grid(path, images, rows, palette=None):
        palettes.append(palette)
        return save_prediction_grid(path, images, rows, palette=palette)

    monkeypatch.setattr(kdseg.tasks.distill, "save_prediction_grid", save_grid)
    cfg = dataset_cfg(make_cfg, written, "loss=none", "logger.run_name=ds-baseline")
    assert 0.0 <= run(cfg) <= 1.0
    assert palettes == [dataset_classes(written.name).palette]
    metrics = mlflow_run(cfg, "ds-baseline", written.name).data.metrics
    present, _ = FIRST_CLASS[written.name]
    names = set(dataset_classes(written.name).names)
    logged = {k.removeprefix("val/iou/") for k in metrics if k.startswith("val/iou/")}
    assert present in logged and logged <= names
    assert f"| {present} | " in (tmp_path / "out" / "per_class_iou.md").read_text()


def test_teacher_then_eval_and_figure_use_the_dataset_classes(written, make_cfg, tmp_path: Path, monkeypatch) -> None:
    fast = "teacher.model.encoder_name=resnet18"  # any encoder: a smoke teacher, quick on CPU
    miou = run(dataset_cfg(make_cfg, written, "task=teacher", fast))
    checkpoint = tmp_path / "out" / "last.pt"
    cfg = dataset_cfg(make_cfg, written, "task=eval", f"checkpoint={checkpoint}")
    assert run(cfg) == pytest.approx(miou)
    present, _ = FIRST_CLASS[written.name]
    for run_name in (f"teacher-resnet18-{written.name}", "eval-teacher-resnet18-seed0-last"):
        metrics = mlflow_run(cfg, run_name, written.name).data.metrics
        assert f"val/iou/{present}" in metrics and "val/iou/background" not in metrics, run_name
    # every evaluation mode on the dataset's own (odd-sized) val images, logged with its class names
    for mode in ("slide", "ms_flip"):
        cfg = dataset_cfg(make_cfg, written, "task=eval", f"checkpoint={checkpoint}", f"eval={mode}", "eval.crop=32",
                          "eval.scales=[0.75,1.0]", f"logger.run_name=eval-{mode}")
        assert 0.0 <= run(cfg) <= 1.0
        metrics = mlflow_run(cfg, f"eval-{mode}", written.name).data.metrics
        assert f"val/iou/{present}" in metrics and "val/iou/background" not in metrics, mode
    drawn = {}

    def save_grid(path, images, rows, palette=None):
        drawn.update(path=path, masks=rows[0][1], palette=palette)
        return save_prediction_grid(path, images, rows, palette=palette)

    monkeypatch.setattr(kdseg.figure, "save_prediction_grid", save_grid)
    figure = qualitative_figure(tmp_path / "figure.png", written.root, [("teacher", checkpoint)], k=2, dataset=written.name)
    assert figure.is_file() and drawn["palette"] == dataset_classes(written.name).palette
    for mask, (_, _, expected) in zip(drawn["masks"], written.val):  # the val split, padded to a multiple of 16
        np.testing.assert_array_equal(mask[: expected.shape[0], : expected.shape[1]].numpy(), expected)


def test_distill_on_real_data_needs_a_teacher_checkpoint(written, make_cfg) -> None:
    with pytest.raises(ConfigError, match=f"teacher.checkpoint is null and dataset={written.name}: train a teacher first"):
        run(dataset_cfg(make_cfg, written, "loss=pi"))
