"""One reader for VOC 2012, VOC + SBD ("aug") and the built-in set: all share the VOC layout.

A split is a list file under ``root``. Each line is either an image id (``2007_000032``)
or an image/mask path pair as in the common SBD lists
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kdseg.data.dataset import SegmentationDataset
from kdseg.errors import DataError, MissingDataError
from kdseg.utils import not_a_folder

LAYOUT_HINT = "a VOC2012-style folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"


def read_split(root: Path, list_file: str, image_dir: str, mask_dir: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split; raises naming the file when the list is missing or empty."""
    list_path = root / list_file
    if not list_path.is_file():
        raise MissingDataError(f"split file '{list_path}' does not exist (dataset.root='{root}' should be {LAYOUT_HINT})")
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
            raise DataError(
                f"{list_path}:{lineno}: expected an image id or an 'image mask' path pair, got '{line.strip()}'"
            )
    if not pairs:
        raise DataError(f"split file '{list_path}' lists no images")
    return pairs


class VOCSegmentation(SegmentationDataset):
    """The pairs of one VOC-layout split list (see :class:`~kdseg.data.dataset.SegmentationDataset`)."""

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str,
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClass",
        transforms: Callable | None = None,
        num_classes: int | None = None,
        on_bad_sample: str = "error",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingDataError(f"dataset.root '{self.root}' {not_a_folder(self.root)} (expected {LAYOUT_HINT})")
        samples = read_split(self.root, list_file, image_dir, mask_dir)
        super().__init__(samples, f"'{self.root / list_file}'", transforms, num_classes, on_bad_sample)
