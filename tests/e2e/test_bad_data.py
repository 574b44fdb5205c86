"""Bad datasets: every kind of broken file is one clear error line naming it, or skipped and counted.

Each test writes a small built-in dataset (8 train / 2 val images of 64 px, VOC layout) into
its own folder, breaks it in one way and runs it as ``dataset=voc``, through the same
error reporting as ``run.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from kdseg.data import build_datasets
from kdseg.data.synthetic import generate
from kdseg.errors import reported
from kdseg.resume import read_run
from kdseg.tasks import run

from ..conftest import ROOT

TRAIN_IDS = [f"2026_{i:06d}" for i in range(1, 9)]
VAL_IDS = ["2026_000009", "2026_000010"]
VOC64 = ["trainer=smoke", "dataset=voc", "dataset.base_size=64", "dataset.crop_size=64", "dataset.eval_mode=full", "loss=none"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return generate(tmp_path / "VOC2012", num_train=len(TRAIN_IDS), num_val=len(VAL_IDS), size=64, seed=0)


def image(root: Path, sample: str) -> Path:
    return root / "JPEGImages" / f"{sample}.jpg"


def mask(root: Path, sample: str) -> Path:
    return root / "SegmentationClass" / f"{sample}.png"


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncate_png(path: Path) -> Path:
    """Cut a PNG halfway through its pixel data (its header stays readable)."""
    data = path.read_bytes()
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4 : start], "big")
    path.write_bytes(data[: start + 4 + length // 2])
    return path


def write_mask(path: Path, labels: np.ndarray, mode: str = "L") -> Path:
    Image.fromarray(labels).convert(mode).save(path)
    return path


# Each breaks the folder and returns (path named in the error, phrase, pre-flight?).
def missing_image(root):
    image(root, TRAIN_IDS[1]).unlink()
    return image(root, TRAIN_IDS[1]), "does not exist", True


def missing_mask(root):
    mask(root, TRAIN_IDS[2]).unlink()
    return mask(root, TRAIN_IDS[2]), "does not exist", True


def unreadable_image(root):
    image(root, TRAIN_IDS[3]).write_bytes(b"this is not a JPEG file")
    return image(root, TRAIN_IDS[3]), "cannot be read as an image", True


def unreadable_mask(root):
    mask(root, TRAIN_IDS[3]).write_bytes(b"\x00" * 64)
    return mask(root, TRAIN_IDS[3]), "cannot be read as an image", True


def wrong_mask_mode(root):
    write_mask(mask(root, TRAIN_IDS[4]), np.zeros((64, 64), np.uint8), mode="RGB")
    return mask(root, TRAIN_IDS[4]), "has mode RGB", True


def size_mismatch(root):
    write_mask(mask(root, TRAIN_IDS[5]), np.zeros((48, 64), np.uint8))
    return mask(root, TRAIN_IDS[5]), "is (64, 64) (HxW) but its mask", True


def truncated_image(root):
    return truncate(image(root, VAL_IDS[0])), "is truncated or corrupt", False


def truncated_mask(root):
    return truncate_png(mask(root, VAL_IDS[1])), "is truncated or corrupt", False


def labels_out_of_range(root):
    labels = np.zeros((64, 64), np.uint8)
    labels[:4, :4], labels[4:6, :4] = 30, 255
    return write_mask(mask(root, VAL_IDS[0]), labels), "has label(s) 30 outside 0..20 and 255 (16 pixels)", False


def missing_root(root):
    return root.parent / "nowhere", "does not exist", True


def missing_split(root):
    path = root / "ImageSets" / "Segmentation" / "val.txt"
    path.unlink()
    return path, "does not exist", True


def empty_split(root):
    path = root / "ImageSets" / "Segmentation" / "train.txt"
    path.write_text("\n")
    return path, "lists no images", True


KINDS = [missing_image, missing_mask, unreadable_image, unreadable_mask, wrong_mask_mode, size_mismatch,
         truncated_image, truncated_mask, labels_out_of_range, missing_root, missing_split, empty_split]


@pytest.mark.parametrize("breaks", KINDS, ids=[k.__name__ for k in KINDS])
def test_each_kind_of_bad_file_is_one_error_line_naming_it(make_cfg, root, tmp_path, breaks):
    named, phrase, preflight = breaks(root)
    data_root = named if breaks is missing_root else root
    cfg = make_cfg(*VOC64, f"dataset.root={data_root}", smoke=False)
    with pytest.raises(SystemExit) as exit_info, reported():
        run(cfg)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"'{named}'" in message and phrase in message
    started = read_run(tmp_path / "out")
    assert started is None if preflight else started["status"] == "failed"  # pre-flight: stopped before training


def test_bad_samples_are_skipped_counted_and_listed(make_cfg, root, tmp_path, capsys):
    bad = [missing_image(root)[0], wrong_mask_mode(root)[0], size_mismatch(root)[0],
           truncate(image(root, TRAIN_IDS[6])), labels_out_of_range(root)[0]]
    cfg = make_cfg(*VOC64, f"dataset.root={root}", "dataset.on_bad_sample=skip", "logger.run_name=skip-bad", smoke=False)
    train, val = build_datasets(cfg.dataset)
    assert (len(train), len(val)) == (len(TRAIN_IDS) - 4, len(VAL_IDS) - 1)
    assert 0.0 <= run(cfg) <= 1.0
    listed = (tmp_path / "out" / "bad_samples.txt").read_text()
    assert all(str(path) in listed for path in bad)
    assert "skipped 5 bad sample(s) (train 4, val 1)" in capsys.readouterr().out
    client = MlflowClient(cfg.logger.tracking_uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("kdseg").experiment_id], "attributes.run_name = 'skip-bad'")
    assert mrun.data.metrics["data/skipped_train"] == 4 and mrun.data.metrics["data/skipped_val"] == 1
    assert "bad_samples.txt" in {a.path for a in client.list_artifacts(mrun.info.run_id)}


def test_run_py_prints_one_line_without_traceback(tmp_path, session_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "dataset=voc", f"dataset.root={tmp_path}/nowhere", "loss=none",
         f"paths.cache_dir={session_dir}/cache", f"logger.tracking_uri=sqlite:///{session_dir}/mlflow.db",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: dataset.root '{tmp_path}/nowhere' does not exist (expected a VOC2012-style folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/)"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_first_touch_error_in_a_worker_is_one_line(tmp_path, session_dir, root):
    """A truncated image met by a DataLoader worker process: still one line, naming the file."""
    bad = truncate(image(root, VAL_IDS[0]))
    cmd = [sys.executable, str(ROOT / "run.py"), *VOC64, f"dataset.root={root}", "trainer.num_workers=1",
           f"paths.cache_dir={session_dir}/cache", f"logger.tracking_uri=sqlite:///{session_dir}/mlflow.db",
           f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: image '{bad}' is truncated or corrupt")
    debug = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800, env={**os.environ, "KDSEG_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
