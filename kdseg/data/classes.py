"""PASCAL VOC 2012 class names and colour palette (shared by data, metrics and figures)."""
from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_INDEX = 255


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map as a flat [r, g, b, ...] list (PIL ``putpalette`` format).

    Index 255 ("void") is (224, 224, 192), as in the official devkit.
    """
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette
