"""Label maps: how the values stored in a dataset's mask files become class indices.

VOC masks hold class indices already (no map). Cityscapes' ``*_gtFine_labelIds.png`` hold
labelIds (0..33) of which 19 are trained on; ADE20K's annotations hold 0 (unlabelled) and
1..150; CamVid's (SegNet's 11-class version) hold the classes 0..10 and 11, void. A :class:`LabelMap` is a 256-entry lookup table built once per dataset; a stored value
that is no label of the dataset maps to :data:`INVALID`, which the sample checks report
naming the file and the stored value.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from kdseg.data.classes import ADE20K_CLASSES, CAMVID_CLASSES, IGNORE_INDEX, cityscapes_labels

INVALID = 254
"""What a stored value that is no label of the dataset maps to: neither a class index nor ignored."""


@dataclass(frozen=True, eq=False)
class LabelMap:
    """Stored mask values -> class indices (``IGNORE_INDEX`` = ignored) through ``table[value]``."""

    table: np.ndarray
    expected: str
    """What the stored values should be, for error messages."""

    def __call__(self, stored: np.ndarray) -> np.ndarray:
        return self.table[stored]


@cache
def cityscapes_label_map() -> LabelMap:
    """labelIds -> the 19 trainIds of cityscapesscripts' label table; other labels (trainId 255
    or -1: unlabeled, ego vehicle, parking, ...) and 255 -> ignored."""
    table = np.full(256, INVALID, dtype=np.uint8)
    table[IGNORE_INDEX] = IGNORE_INDEX
    stored = [label for label in cityscapes_labels() if 0 <= label.id < IGNORE_INDEX]  # license plate (-1) is never stored
    for label in stored:
        table[label.id] = label.trainId if 0 <= label.trainId < IGNORE_INDEX else IGNORE_INDEX
    ids = [label.id for label in stored]
    return LabelMap(table, f"Cityscapes labelIds {min(ids)}..{max(ids)} (or {IGNORE_INDEX}, ignored)")


@cache
def ade20k_label_map() -> LabelMap:
    """0 (unlabelled) -> ignored, 1..150 -> classes 0..149, 255 -> ignored (as mmseg's reduce_zero_label)."""
    n = len(ADE20K_CLASSES)
    table = np.full(256, INVALID, dtype=np.uint8)
    table[1 : n + 1] = np.arange(n)
    table[0] = table[IGNORE_INDEX] = IGNORE_INDEX
    return LabelMap(table, f"ADE20K labels 0..{n} (0 = unlabelled, ignored; or {IGNORE_INDEX}, ignored)")


@cache
def camvid_label_map() -> LabelMap:
    """0..10 -> themselves, 11 (void) -> ignored (CIRKD's ``dataset/camvid.py`` makes it its ignore
    label), 255 -> ignored."""
    n = len(CAMVID_CLASSES)
    table = np.full(256, INVALID, dtype=np.uint8)
    table[:n] = np.arange(n)
    table[n] = table[IGNORE_INDEX] = IGNORE_INDEX
    return LabelMap(table, f"CamVid labels 0..{n} ({n} = void, ignored; or {IGNORE_INDEX}, ignored)")
