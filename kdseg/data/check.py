"""Sample checks shared by the dataset reader and the data-check CLI (``python -m kdseg.data``).

A sample is an image and its mask. What can go wrong, each reported naming the file:

- the image or mask does not exist;
- it is not a readable image (not an image file, or a broken header);
- the mask is not a palette / grey PNG of class indices;
- image and mask differ in size;
- the file is truncated or corrupt (seen only when the pixels are decoded);
- the mask holds labels outside ``0..num_classes-1`` and 255 (for Cityscapes, ADE20K, CamVid:
  stored values that are no label of the dataset, see :mod:`kdseg.data.labels`).

The first four are seen from the file headers alone (``deep=False``: fast enough to run
before every training); the last two need every file decoded (``deep=True``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdseg.data.classes import IGNORE_INDEX
from kdseg.data.labels import LabelMap
from kdseg.errors import DataError, MissingDataError

MASK_MODES = ("P", "L")


@dataclass(frozen=True)
class Problem:
    """One bad sample: the file at fault and what is wrong with it."""

    path: Path
    message: str
    missing: bool = False

    def __str__(self) -> str:
        return self.message


def _open(path: Path, kind: str) -> Image.Image:
    if not path.is_file():
        raise MissingDataError(f"{kind} '{path}' does not exist")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{kind} '{path}' cannot be read as an image ({_reason(err)})") from err


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _decode(img: Image.Image, path: Path, kind: str) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"{kind} '{path}' is truncated or corrupt ({_reason(err)})") from err


def read_image(path: Path) -> np.ndarray:
    """The RGB pixels (H x W x 3 uint8); a DataError naming the file if it cannot be read."""
    with _open(path, "image") as img:
        _decode(img, path, "image")
        return np.asarray(img.convert("RGB"))


def check_labels(labels: np.ndarray, path: Path, num_classes: int | None, label_map: LabelMap | None = None,
                 stored: np.ndarray | None = None) -> None:
    """Raise if the (mapped) mask holds a label that is neither a class index nor 255.

    With a ``label_map`` the error names the ``stored`` values (those in the file) and what
    the dataset's masks should hold.
    """
    if num_classes is None:
        return
    bad = (labels >= num_classes) & (labels != IGNORE_INDEX)
    if bad.any():
        values = np.unique((labels if stored is None else stored)[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        if label_map is None:
            raise DataError(
                f"mask '{path}' has label(s) {shown} outside 0..{num_classes - 1} and {IGNORE_INDEX} "
                f"({int(bad.sum())} pixels)"
            )
        raise DataError(f"mask '{path}' has label(s) {shown} ({int(bad.sum())} pixels); expected {label_map.expected}")


def _check_mask_mode(img: Image.Image, path: Path) -> None:
    if img.mode not in MASK_MODES:
        raise DataError(f"mask '{path}' has mode {img.mode}; expected a palette (P) or grey (L) PNG of class indices")


def read_mask(path: Path, num_classes: int | None = None, label_map: LabelMap | None = None) -> np.ndarray:
    """The class indices (H x W uint8, 255 = void), through ``label_map`` when the file stores
    other values; a DataError naming the file if it is unusable."""
    with _open(path, "mask") as img:
        _check_mask_mode(img, path)
        _decode(img, path, "mask")
        stored = np.asarray(img)
    labels = stored.copy() if label_map is None else label_map(stored)
    check_labels(labels, path, num_classes, label_map, stored)
    return labels


def check_sizes(image_path: Path, image_hw: tuple[int, int], mask_path: Path, mask_hw: tuple[int, int]) -> None:
    if tuple(image_hw) != tuple(mask_hw):
        raise DataError(
            f"image '{image_path}' is {tuple(image_hw)} (HxW) but its mask '{mask_path}' is {tuple(mask_hw)}"
        )


def check_sample(
    image_path: Path, mask_path: Path, num_classes: int | None, deep: bool, label_map: LabelMap | None = None
) -> list[Problem]:
    """Every problem of one sample (empty if it is fine); ``deep`` decodes the pixels too."""
    problems, sizes = [], {}
    for path, kind in ((image_path, "image"), (mask_path, "mask")):
        try:
            if deep:
                pixels = read_image(path) if kind == "image" else read_mask(path, num_classes, label_map)
                sizes[kind] = pixels.shape[:2]
            else:
                with _open(path, kind) as img:
                    if kind == "mask":
                        _check_mask_mode(img, path)
                    sizes[kind] = (img.height, img.width)
        except DataError as err:
            problems.append(Problem(path, str(err), isinstance(err, MissingDataError)))
    if len(sizes) == 2:
        try:
            check_sizes(image_path, sizes["image"], mask_path, sizes["mask"])
        except DataError as err:
            problems.append(Problem(mask_path, str(err)))
    return problems


def scan(
    samples: Sequence[tuple[Path, Path]],
    num_classes: int | None,
    deep: bool,
    workers: int | None = None,
    label_map: LabelMap | None = None,
) -> list[list[Problem]]:
    """``check_sample`` for every sample (in threads: decoding releases the GIL), in order."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: check_sample(*pair, num_classes, deep, label_map), samples))


def summarize(problems: Sequence[Problem], source: str, shown: int = 3) -> str:
    """One line: how many problems in ``source``, the first ``shown`` of them, and what to do."""
    head = "; ".join(str(p) for p in problems[:shown])
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    count = "1 bad sample" if len(problems) == 1 else f"{len(problems)} problems"
    return (
        f"{count} in {source}: {head}{more}. `python -m kdseg.data` lists every problem; "
        "dataset.on_bad_sample=skip trains without the bad samples"
    )
