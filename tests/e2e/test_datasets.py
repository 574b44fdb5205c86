"""Cityscapes and ADE20K through runs: the dataset's class names in metrics, tables, figures; a teacher needed.

Each test writes a small folder in the dataset's real layout (odd image sizes, stored mask
values including the ignored ones) and checks the reader against label maps computed by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import kdseg.figure
import kdseg.tasks.distill
from kdseg.data.classes import dataset_classes
from kdseg.errors import ConfigError
from kdseg.figure import qualitative_figure
from kdseg.tasks import run
from kdseg.viz import save_prediction_grid

# Stored value -> class index, by hand from the datasets' documentation (255: ignored).
# Cityscapes labelIds: unlabeled 0, ego vehicle 1 -> ignored; road 7 -> 0, sidewalk 8 -> 1,
# person 24 -> 11, car 26 -> 13, parking 9 (trainId 255) -> ignored, bicycle 33 -> 18.
CITYSCAPES_MAP = {0: 255, 1: 255, 7: 0, 8: 1, 9: 255, 24: 11, 26: 13, 33: 18}
# ADE20K: 0 ("other") -> ignored, k -> k - 1, 255 -> ignored.
ADE20K_MAP = {0: 255, 1: 0, 2: 1, 75: 74, 150: 149, 255: 255}

# relative name -> (width, height); sorted by name, the order the reader lists them in.
# The two val images share one (odd) size, so a batch of both pads them as a batch of one does.
SPLITS = {
    "cityscapes": {
        "train": {"aachen/aachen_000000_000019": (67, 45), "aachen/aachen_000001_000019": (45, 67), "bochum/bochum_000000_000313": (81, 37)},
        "val": {"frankfurt/frankfurt_000000_000294": (59, 41), "lindau/lindau_000000_000019": (59, 41)},
    },
    "ade20k": {
        "training": {"ADE_train_00000001": (67, 45), "ADE_train_00000002": (45, 67), "ADE_train_00000003": (81, 37)},
        "validation": {"ADE_val_00000001": (59, 41), "ADE_val_00000002": (59, 41)},
    },
}
FIRST_CLASS = {"cityscapes": ("road", 7), "ade20k": ("wall", 1)}  # a class every val mask holds, and its stored value


@dataclass
class Written:
    """A dataset folder written by a test: per split, (image, mask, class indices by hand)."""

    name: str
    root: Path
    splits: dict[str, list[tuple[Path, Path, np.ndarray]]]

    @property
    def train(self) -> list[tuple[Path, Path, np.ndarray]]:
        return next(iter(self.splits.values()))

    @property
    def val(self) -> list[tuple[Path, Path, np.ndarray]]:
        return list(self.splits.values())[1]


def _paths(name: str, root: Path, split: str, stem: str) -> tuple[Path, Path]:
    if name == "cityscapes":
        return root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", root / "gtFine" / split / f"{stem}_gtFine_labelIds.png"
    return root / "images" / split / f"{stem}.jpg", root / "annotations" / split / f"{stem}.png"


def _stored(rng: np.random.Generator, values: list[int], width: int, height: int, first: int) -> np.ndarray:
    """7-px blocks of random stored values; the top-left block holds ``first``."""
    blocks = rng.choice(np.array(values, dtype=np.uint8), (height // 7 + 1, width // 7 + 1))
    blocks[0, 0] = first
    return blocks.repeat(7, axis=0).repeat(7, axis=1)[:height, :width]


def write_dataset(name: str, root: Path) -> Written:
    """The dataset's folder layout with a few images; Cityscapes also gets the *_color /
    *_instanceIds / *_polygons.json files that gtFine holds, which the reader must pass over."""
    rng = np.random.default_rng(0)
    mapping = CITYSCAPES_MAP if name == "cityscapes" else ADE20K_MAP
    splits = {}
    for split, samples in SPLITS[name].items():
        splits[split] = []
        for stem, (width, height) in samples.items():
            image_path, mask_path = _paths(name, root, split, stem)
            for path in (image_path, mask_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (height // 9 + 1, width // 9 + 1, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((width, height)).save(image_path)
            stored = _stored(rng, list(mapping), width, height, FIRST_CLASS[name][1])
            Image.fromarray(stored).save(mask_path)
            if name == "cityscapes":
                base = str(mask_path).removesuffix("_labelIds.png")
                Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(f"{base}_color.png")
                Image.fromarray(stored.astype(np.uint16) * 1000).save(f"{base}_instanceIds.png")  # 16-bit, as the real ones
                Path(f"{base}_polygons.json").write_text("{}")
            expected = np.vectorize(mapping.__getitem__)(stored).astype(np.uint8)
            splits[split].append((image_path, mask_path, expected))
    return Written(name, root, splits)


@pytest.fixture(params=["cityscapes", "ade20k"])
def written(request, tmp_path: Path) -> Written:
    folder = "cityscapes" if request.param == "cityscapes" else "ADEChallengeData2016"
    return write_dataset(request.param, tmp_path / folder)


def dataset_cfg(make_cfg, data: Written, *overrides: str):
    """The composed config for ``data`` at 64 px crops (trainer=smoke), its speed measured at 64 x 64."""
    sizes = ("dataset.base_size=64", "dataset.crop_size=64", "dataset.eval_size=[64,64]", "speed.repeats=2", "speed.warmup=1",
             "logger.log_checkpoints=false")
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
    for run_name in (f"teacher-resnet18-{written.name}", "eval-last"):
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
