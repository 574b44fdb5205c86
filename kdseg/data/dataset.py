"""The one dataset class: (image, mask) file pairs, an optional label map, a joint transform.

VOC, Cityscapes, ADE20K and CamVid differ only in how they list their pairs (:mod:`kdseg.data.voc`,
:mod:`kdseg.data.folders`) and map their stored mask values (:mod:`kdseg.data.labels`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import tv_tensors

from kdseg.data.check import Problem, check_sizes, read_image, read_mask, scan, summarize
from kdseg.data.labels import LabelMap
from kdseg.errors import DataError, MissingDataError
from kdseg.utils import choice


class OnBadSample(str, Enum):
    """``dataset.on_bad_sample``: what a bad sample does (see :class:`SegmentationDataset`)."""

    error = "error"
    skip = "skip"


class SegmentationDataset(Dataset):
    """Image / mask pairs of one split, returned through a joint v2 transform.

    Bad samples (see :mod:`kdseg.data.check`) are handled by ``on_bad_sample``:

    - ``error``: a pre-flight scan of the file headers fails construction, naming the files
      that are missing, unreadable, of the wrong mask mode or of mismatched sizes; a
      truncated file or a mask with labels outside ``0..num_classes-1`` and 255 (after
      ``label_map``) fails when the sample is first read.
    - ``skip``: every file is decoded up front and the bad samples are left out; they are
      listed in ``skipped`` (an empty split is still an error).

    ``source`` names the split in messages (a list file, a folder).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, Path]],
        source: str,
        transforms: Callable | None = None,
        num_classes: int | None = None,
        on_bad_sample: str = "error",
        label_map: LabelMap | None = None,
    ) -> None:
        self.transforms = transforms
        self.num_classes = num_classes
        self.label_map = label_map
        skip = choice(OnBadSample, on_bad_sample, "on_bad_sample") is OnBadSample.skip
        found = scan(samples, num_classes, deep=skip, label_map=label_map)
        problems = [p for sample_problems in found for p in sample_problems]
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
        mask = tv_tensors.Mask(read_mask(mask_path, self.num_classes, self.label_map))
        check_sizes(image_path, tuple(image.shape[-2:]), mask_path, tuple(mask.shape[-2:]))
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask
