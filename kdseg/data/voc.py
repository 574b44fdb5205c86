"""One reader for VOC 2012, VOC + SBD ("aug") and the built-in set: all share the VOC layout.

A split is a list file under ``root``. Each line is either an image id (``2007_000032``)
or an image/mask path pair as in the common SBD lists
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

LAYOUT_HINT = "a VOC2012-style folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"


def read_split(root: Path, list_file: str, image_dir: str, mask_dir: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split; raises naming the file when the list or a file is missing."""
    list_path = root / list_file
    if not list_path.is_file():
        raise FileNotFoundError(f"split file '{list_path}' does not exist (dataset.root='{root}' should be {LAYOUT_HINT})")
    pairs = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            pairs.append((root / image_dir / f"{fields[0]}.jpg", root / mask_dir / f"{fields[0]}.png"))
        elif len(fields) == 2:
            pairs.append((root / fields[0].lstrip("/"), root / fields[1].lstrip("/")))
        else:
            raise ValueError(
                f"{list_path}:{lineno}: expected an image id or an 'image mask' path pair, got '{line.strip()}'"
            )
    if not pairs:
        raise ValueError(f"split file '{list_path}' lists no images")
    return pairs


class VOCSegmentation(Dataset):
    """Image / mask pairs of one split, returned through a joint v2 transform.

    Every listed image and mask is checked to exist up front, so a broken folder fails
    before training starts, naming the first missing files.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str,
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClass",
        transforms: Callable | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset.root '{self.root}' does not exist (expected {LAYOUT_HINT})")
        self.samples = read_split(self.root, list_file, image_dir, mask_dir)
        self.transforms = transforms
        missing = [str(p) for pair in self.samples for p in pair if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise FileNotFoundError(
                f"{len(missing)} file(s) listed in '{self.root / list_file}' are missing: {', '.join(missing[:3])}{more}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The untransformed RGB image and its label mask (uint8 class indices, 255 = void)."""
        image_path, mask_path = self.samples[index]
        with Image.open(image_path) as img:
            image = tv_tensors.Image(np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy())
        with Image.open(mask_path) as m:
            if m.mode not in ("P", "L"):
                raise ValueError(f"mask '{mask_path}' has mode {m.mode}; expected a palette (P) or grey (L) PNG of class indices")
            mask = tv_tensors.Mask(np.asarray(m).copy())
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"image '{image_path}' is {tuple(image.shape[-2:])} (HxW) but its mask '{mask_path}' is {tuple(mask.shape[-2:])}"
            )
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask
