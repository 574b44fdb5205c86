"""Cityscapes, ADE20K and CamVid: each split is a pair of folders (images, masks), no list files.

A split is every file of its image and mask folders, matched by name and sorted (so the
order, and a seeded run, is the same on every machine). A file whose partner is missing is
still listed, so that the sample checks report it by name like any missing file; a missing
or empty split folder is an error naming the folder and the expected layout.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdseg.data.classes import dataset_classes
from kdseg.data.dataset import SegmentationDataset
from kdseg.data.labels import LabelMap, ade20k_label_map, camvid_label_map, cityscapes_label_map
from kdseg.errors import MissingDataError
from kdseg.utils import not_a_folder


@dataclass(frozen=True)
class FolderLayout:
    """Where a split's images and masks are, how they are named, and how masks map to classes."""

    image_dir: str
    """The images' folder under the root, ``{split}`` standing for the split's name."""
    mask_dir: str
    """The masks' folder, likewise."""
    image_suffix: str
    mask_suffix: str
    nested: bool
    """Images sit one folder deeper (Cityscapes: one folder per city)."""
    label_map: Callable[[], LabelMap]
    val_split: str
    """The val split folder's name in the released dataset."""
    hint: str
    """The expected layout, for error messages."""

    def folders(self, root: Path, split: str) -> tuple[Path, Path]:
        return root / self.image_dir.format(split=split), root / self.mask_dir.format(split=split)


LAYOUTS: dict[str, FolderLayout] = {
    "cityscapes": FolderLayout(
        "leftImg8bit/{split}", "gtFine/{split}", "_leftImg8bit.png", "_gtFine_labelIds.png", True, cityscapes_label_map, "val",
        "a Cityscapes folder holding leftImg8bit/<split>/<city>/<name>_leftImg8bit.png "
        "and gtFine/<split>/<city>/<name>_gtFine_labelIds.png",
    ),
    "ade20k": FolderLayout(
        "images/{split}", "annotations/{split}", ".jpg", ".png", False, ade20k_label_map, "validation",
        "the ADEChallengeData2016 folder holding images/<split>/ADE_*.jpg and annotations/<split>/ADE_*.png",
    ),
    "camvid": FolderLayout(
        "{split}", "{split}annot", ".png", ".png", False, camvid_label_map, "val",
        "a CamVid folder (SegNet's 11-class version) holding <split>/*.png and <split>annot/*.png",
    ),
}
SPLIT_KEYS = ("train_split", "val_split")
"""The dataset config keys naming the train and val split folders."""


def list_pairs(root: str | os.PathLike, name: str, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split, sorted by name; raises naming the folder when it is missing or empty."""
    layout, root = LAYOUTS[name], Path(root)
    if not root.is_dir():
        raise MissingDataError(f"dataset.root '{root}' {not_a_folder(root)} (expected {layout.hint})")
    folders = layout.folders(root, split)
    for folder in folders:
        if not folder.is_dir():
            raise MissingDataError(f"split folder '{folder}' {not_a_folder(folder)} (dataset.root='{root}' should be {layout.hint})")
    pattern = "*/*" if layout.nested else "*"
    stems: set[str] = set()
    for folder, suffix in zip(folders, (layout.image_suffix, layout.mask_suffix)):
        stems |= {path.relative_to(folder).as_posix()[: -len(suffix)] for path in folder.glob(pattern + suffix)}
    if not stems:
        raise MissingDataError(
            f"split folders '{folders[0]}' and '{folders[1]}' hold no *{layout.image_suffix} images "
            f"or *{layout.mask_suffix} masks (expected {layout.hint})"
        )
    return [(folders[0] / f"{stem}{layout.image_suffix}", folders[1] / f"{stem}{layout.mask_suffix}") for stem in sorted(stems)]


def folder_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    transforms: Callable | None = None,
    num_classes: int | None = None,
    on_bad_sample: str = "error",
) -> SegmentationDataset:
    """One split of ``name`` (a key of :data:`LAYOUTS`); ``num_classes`` defaults to the dataset's."""
    layout = LAYOUTS[name]
    samples = list_pairs(root, name, split)
    source = f"'{layout.folders(Path(root), split)[0]}'"
    num_classes = len(dataset_classes(name).names) if num_classes is None else num_classes
    return SegmentationDataset(samples, source, transforms, num_classes, on_bad_sample, layout.label_map())
