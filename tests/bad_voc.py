"""A small built-in dataset in VOC layout (8 train / 2 val images of 64 px) and the ways the tests break it:
each breaker damages one file and returns (what the error names, what it says, whether the data check sees it
before any sample is read).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdseg.data.synthetic import generate

TRAIN_IDS = [f"2026_{i:06d}" for i in range(1, 9)]
VAL_IDS = ["2026_000009", "2026_000010"]
VOC64 = ["trainer=smoke", "dataset=voc", "dataset.base_size=64", "dataset.crop_size=64", "dataset.eval_mode=full", "loss=none"]


def write_voc64(folder: Path) -> Path:
    """The built-in dataset (8 train / 2 val, 64 px) written as ``folder/VOC2012``; returns that root."""
    return generate(folder / "VOC2012", num_train=len(TRAIN_IDS), num_val=len(VAL_IDS), size=64, seed=0)


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
