"""Bad datasets without a run (kdseg.data.check and its CLI, ``python -m kdseg.data``): every problem listed
at once; all samples bad is an error even when skipping.

Each test writes a small built-in dataset (8 train / 2 val images of 64 px, VOC layout) into
its own folder and breaks it in one way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdseg.data import build_datasets
from kdseg.data.__main__ import main as check_main
from kdseg.data.synthetic import generate

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


def test_all_samples_bad_is_an_error_even_when_skipping(make_cfg, root):
    for sample in VAL_IDS:
        truncate_png(mask(root, sample))
    cfg = make_cfg(*VOC64, f"dataset.root={root}", "dataset.on_bad_sample=skip", smoke=False)
    with pytest.raises(ValueError, match=r"all 2 samples are bad, nothing left"):
        build_datasets(cfg.dataset)


def test_check_reports_every_problem_at_once(root, tmp_path, capsys, monkeypatch):
    broken = [k(root)[0] for k in (missing_mask, unreadable_image, size_mismatch, truncated_image, truncated_mask)]
    monkeypatch.chdir(tmp_path)
    assert check_main(["dataset=voc", f"dataset.root={root}"]) == 1
    out = capsys.readouterr().out
    for path in broken:
        assert str(path) in out
    assert "train: 8 samples" in out and "val: 2 samples" in out and "5 problem(s) found" in out
    assert check_main(["dataset=voc", f"dataset.root={generate(tmp_path / 'good', 4, 2, 64, 0)}"]) == 0
    assert "dataset OK" in capsys.readouterr().out


def test_check_with_a_bad_override_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        check_main(["dataset=vocc"])
    assert str(exit_info.value.code).startswith("error: ") and "vocc" in str(exit_info.value.code)
