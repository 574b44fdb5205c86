"""Cityscapes, ADE20K, CamVid and VOC + SBD folders written in their real layouts (odd image sizes,
stored mask values including the ignored ones), with the class indices each mask must map to,
computed by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kdseg.data.classes import voc_palette

# Stored value -> class index, by hand from the datasets' documentation (255: ignored).
# Cityscapes labelIds: unlabeled 0, ego vehicle 1 -> ignored; road 7 -> 0, sidewalk 8 -> 1,
# person 24 -> 11, car 26 -> 13, parking 9 (trainId 255) -> ignored, bicycle 33 -> 18.
CITYSCAPES_MAP = {0: 255, 1: 255, 7: 0, 8: 1, 9: 255, 24: 11, 26: 13, 33: 18}
# ADE20K: 0 ("other") -> ignored, k -> k - 1, 255 -> ignored.
ADE20K_MAP = {0: 255, 1: 0, 2: 1, 75: 74, 150: 149, 255: 255}
# CamVid (SegNet's 11 classes): 0 sky, 3 road, 8 car, 10 bicyclist stay; 11 (void) and 255 -> ignored.
CAMVID_MAP = {0: 0, 3: 3, 8: 8, 10: 10, 11: 255, 255: 255}
# VOC + SBD masks hold class indices: background 0, aeroplane 1, person 15, tvmonitor 20 stay; 255 stays ignored.
VOC_MAP = {0: 0, 1: 1, 15: 15, 20: 20, 255: 255}
MAPS = {"cityscapes": CITYSCAPES_MAP, "ade20k": ADE20K_MAP, "camvid": CAMVID_MAP, "voc_aug": VOC_MAP}

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
    "camvid": {  # a third split, test, which val_split=test reads
        "train": {"0001TP_006690": (67, 45), "0006R0_f02910": (45, 67), "Seq05VD_f00000": (81, 37)},
        "val": {"0016E5_07959": (59, 41), "0016E5_07961": (59, 41)},
        "test": {"0001TP_008550": (53, 39)},
    },
    "voc_aug": {  # train: SBD's masks (SegmentationClassAug, grey) listed in train_aug.txt; val: VOC's palette masks
        "train": {"2007_000032": (67, 45), "2008_000002": (45, 67), "2011_003276": (81, 37)},
        "val": {"2007_000033": (59, 41), "2007_000042": (59, 41)},
    },
}
FIRST_CLASS = {"cityscapes": ("road", 7), "ade20k": ("wall", 1), "camvid": ("road", 3), "voc_aug": ("person", 15)}
"""A class every val mask holds, and its stored value."""


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
    if name == "camvid":
        return root / split / f"{stem}.png", root / f"{split}annot" / f"{stem}.png"
    if name == "voc_aug":
        masks = "SegmentationClassAug" if split == "train" else "SegmentationClass"
        return root / "JPEGImages" / f"{stem}.jpg", root / masks / f"{stem}.png"
    return root / "images" / split / f"{stem}.jpg", root / "annotations" / split / f"{stem}.png"


def _stored(rng: np.random.Generator, values: list[int], width: int, height: int, first: int) -> np.ndarray:
    """7-px blocks of random stored values; the top-left block holds ``first``."""
    blocks = rng.choice(np.array(values, dtype=np.uint8), (height // 7 + 1, width // 7 + 1))
    blocks[0, 0] = first
    return blocks.repeat(7, axis=0).repeat(7, axis=1)[:height, :width]


def write_dataset(name: str, root: Path) -> Written:
    """The dataset's folder layout with a few images; Cityscapes also gets the *_color /
    *_instanceIds / *_polygons.json files that gtFine holds, which the reader must pass over;
    VOC + SBD its list files and VOC's val masks as palette PNGs."""
    rng = np.random.default_rng(0)
    mapping = MAPS[name]
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
            mask = Image.fromarray(stored)
            if name == "voc_aug" and split == "val":  # VOC's own masks are palette PNGs
                mask = Image.frombytes("P", mask.size, stored.tobytes())
                mask.putpalette(voc_palette())
            mask.save(mask_path)
            if name == "cityscapes":
                base = str(mask_path).removesuffix("_labelIds.png")
                Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(f"{base}_color.png")
                Image.fromarray(stored.astype(np.uint16) * 1000).save(f"{base}_instanceIds.png")  # 16-bit, as the real ones
                Path(f"{base}_polygons.json").write_text("{}")
            expected = np.vectorize(mapping.__getitem__)(stored).astype(np.uint8)
            splits[split].append((image_path, mask_path, expected))
    if name == "voc_aug":
        lists = root / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True)
        for split, file in (("train", "train_aug.txt"), ("val", "val.txt")):
            (lists / file).write_text("".join(f"{stem}\n" for stem in SPLITS[name][split]))
    return Written(name, root, splits)
