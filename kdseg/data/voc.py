"""One reader for VOC 2012, VOC + SBD ("aug") and the built-in set: all share the VOC layout.

A split is a list file under ``root``. Each line is either an image id (``2007_000032``)
or an image/mask path pair as in the common SBD lists
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import tv_tensors

from kdseg.data.check import Problem, check_sizes, read_image, read_mask, scan, summarize
from kdseg.errors import DataError, MissingDataError

LAYOUT_HINT = "a VOC2012-style folder holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/"
BAD_SAMPLE_POLICIES = ("error", "skip")


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


class VOCSegmentation(Dataset):
    """Image / mask pairs of one split, returned through a joint v2 transform.

    Bad samples (see :mod:`kdseg.data.check`) are handled by ``on_bad_sample``:

    - ``error``: a pre-flight scan of the file headers fails construction, naming the files
      that are missing, unreadable, of the wrong mask mode or of mismatched sizes; a
      truncated file or a mask with labels outside ``0..num_classes-1`` and 255 fails
      when the sample is first read.
    - ``skip``: every file is decoded up front and the bad samples are left out; they are
      listed in ``skipped`` (an empty split is still an error).
    """

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
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got '{on_bad_sample}'")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingDataError(f"dataset.root '{self.root}' does not exist (expected {LAYOUT_HINT})")
        samples = read_split(self.root, list_file, image_dir, mask_dir)
        self.transforms = transforms
        self.num_classes = num_classes
        skip = on_bad_sample == "skip"
        found = scan(samples, num_classes, deep=skip)
        problems = [p for sample_problems in found for p in sample_problems]
        source = f"'{self.root / list_file}'"
        if problems and not skip:
            error = MissingDataError if all(p.missing for p in problems) else DataError
            raise error(summarize(problems, source))
        self.samples = [pair for pair, bad in zip(samples, found) if not bad]
        self.skipped: list[Problem] = [bad[0] for bad in found if bad]
        if not self.samples:
            raise DataError(f"all {len(samples)} samples are bad, nothing left to train on: {summarize(problems, source)}")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The untransformed RGB image and its label mask (uint8 class indices, 255 = void)."""
        image_path, mask_path = self.samples[index]
        image = tv_tensors.Image(read_image(image_path).transpose(2, 0, 1).copy())
        mask = tv_tensors.Mask(read_mask(mask_path, self.num_classes))
        check_sizes(image_path, tuple(image.shape[-2:]), mask_path, tuple(mask.shape[-2:]))
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask
