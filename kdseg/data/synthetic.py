"""Built-in synthetic segmentation dataset, written to disk in the exact PASCAL VOC 2012 layout.

This machine class has no internet, so the default run trains on procedurally generated
images that the ordinary VOC reader opens unchanged::

    <root>/JPEGImages/<id>.jpg                      RGB JPEG, quality 95
    <root>/SegmentationClass/<id>.png               palette PNG, labels 0..20, 255 = void
    <root>/ImageSets/Segmentation/{train,val,trainval}.txt

The 21 labels keep VOC's palette but have their own names (``SYNTHETIC_CLASSES``: the metrics'
``val/iou/<name>``, the per-class tables): 0 is background and 1..20 are the 5 x 4 combinations
of a SHAPE (disc, square, triangle, ring, cross) and a TEXTURE (solid with noise, stripes,
checker, dots), named ``<shape>-<texture>``; see ``CLASS_DESIGN``. As in photographs,
colour is a useful but incomplete cue: every shape has a colour family (``SHAPE_HUES``, e.g.
reddish discs, bluish triangles) with a jittered shade per object, so colour narrows a pixel
down to the four classes of one shape, and only the texture (and the outline) tells those four
apart. Each image holds 2-3 objects of random scale, position and rotation that occlude each
other (later ones win, in the image and the mask), over a background of gradients,
low-frequency noise and clutter (elongated ellipses and lines in any colour, some of them
textured) that is labelled background. As in VOC, a thin band around every object boundary is
void (255). Pixel noise keeps the images from being trivially clean.

The design is tuned for the CPU budget of the default run (``conf/dataset/synthetic.yaml``):
networks trained from scratch pick up the colour families within ~100 iterations and the
textures over the next few hundred, so a teacher trained for longer is clearly ahead of a
student at a small budget (with pure shape x texture classes and random colours, neither a
ResNet-18 nor a ResNet-101 got past 6% mIoU, about "all background", in 1,200 iterations).

Every image is drawn from its own generator seeded by (seed, split, index), so the same
arguments give byte-identical files and the validation images do not depend on the number
of training images.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from filelock import FileLock
from PIL import Image

from kdseg.data.classes import CLASS_DESIGN, IGNORE_INDEX, SHAPES, SYNTHETIC_CLASSES, TEXTURES, voc_palette

FORMAT_VERSION = 3
MARKER = ".complete"
MIN_SIZE = 32
ID_PREFIX = "2026_"
JPEG_QUALITY = 95

SHAPE_HUES = np.array([[200, 40, 40], [40, 170, 40], [40, 60, 200], [210, 190, 30], [170, 40, 190]], np.float32)
"""RGB hue of each shape's colour family (red discs, green squares, blue triangles, yellow rings, purple crosses)."""

_SPLIT_KEYS = {"train": 0, "val": 1}
_TRIANGLE_NORMALS = np.array([[np.cos(a), np.sin(a)] for a in np.deg2rad([90.0, 210.0, 330.0])])

Mask = np.ndarray
Grid = tuple[np.ndarray, np.ndarray]

_SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], Mask]] = {
    "disc": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "triangle": lambda u, v: np.maximum.reduce([u * nx + v * ny for nx, ny in _TRIANGLE_NORMALS]) <= 0.7,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),
    "cross": lambda u, v: (
        ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0))
    ),
}


def _check_args(num_train: int, num_val: int, size: int, seed: int) -> dict[str, int]:
    """Validate the generation arguments; return them (with the format version) as the cache key."""
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("size", size, MIN_SIZE)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return {"format_version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "size": int(size), "seed": int(seed)}


def _rotated(grid: Grid, cy: float, cx: float, theta: float) -> Grid:
    """Pixel coordinates relative to (cy, cx), rotated by theta (object-local frame, in pixels)."""
    yy, xx = grid
    dy, dx = yy - np.float32(cy), xx - np.float32(cx)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    return dx * c + dy * s, -dx * s + dy * c


def _contrast_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A second colour whose brightness clearly differs from `base` (JPEG keeps luma, blurs chroma)."""
    luma = base @ np.array([0.299, 0.587, 0.114])
    direction = 1.0 if luma < 127.5 else -1.0
    second = base + direction * rng.uniform(70.0, 140.0) + rng.normal(0.0, 40.0, 3)
    return np.clip(second, 0.0, 255.0).astype(np.float32)


def _pattern(rng: np.random.Generator, texture: str, pu: np.ndarray, pv: np.ndarray, size: int) -> Mask | None:
    """Where the second colour goes for `texture` at local pixel coordinates (pu, pv) (None: solid)."""
    if texture == "solid":
        return None
    period = max(4.0, size * rng.uniform(0.07, 0.12))
    a, b = pu / period + rng.uniform(), pv / period + rng.uniform()
    if texture == "stripes":
        angle = rng.uniform(0.0, np.pi)
        return (a * np.cos(angle) + b * np.sin(angle)) % 1.0 < 0.5
    if texture == "checker":
        return (np.floor(a) + np.floor(b)) % 2.0 == 1.0
    da, db = a % 1.0 - 0.5, b % 1.0 - 0.5
    return da * da + db * db <= 0.32**2


def _paint(
    rng: np.random.Generator, image: np.ndarray, inside: Mask, texture: str, local: Grid, size: int,
    base: np.ndarray, second: np.ndarray,
) -> None:
    """Fill the `inside` pixels of `image` with `texture` in colours `base` and `second`, in place."""
    pattern = _pattern(rng, texture, local[0][inside], local[1][inside], size)
    if pattern is None:
        image[inside] = base + 12.0 * rng.standard_normal((int(inside.sum()), 3), dtype=np.float32)
    else:
        image[inside] = np.where(pattern[:, None], second, base)


def _family_colours(rng: np.random.Generator, shape_index: int) -> tuple[np.ndarray, np.ndarray]:
    """An object's two colours: a jittered shade of its shape family's hue, and a darker or lighter one."""
    base = np.clip(SHAPE_HUES[shape_index] * rng.uniform(0.7, 1.2) + rng.normal(0.0, 25.0, 3), 0.0, 255.0)
    if rng.uniform() < 0.5:
        second = base * rng.uniform(0.25, 0.5)
    else:
        second = np.clip(base + rng.uniform(80.0, 140.0), 0.0, 255.0)
    return base.astype(np.float32), second.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, std: float) -> np.ndarray:
    """Low-frequency colour noise: a coarse random grid bilinearly upsampled to (S, S, 3)."""
    coarse = rng.normal(0.0, std, (cells, cells, 3)).astype(np.float32)
    pos = np.linspace(0.0, cells - 1.0, size)
    low = np.minimum(np.floor(pos).astype(int), cells - 2)
    frac = pos - low
    weights = np.zeros((size, cells), dtype=np.float32)
    weights[np.arange(size), low] = 1.0 - frac
    weights[np.arange(size), low + 1] = frac
    return (weights @ coarse.transpose(2, 0, 1) @ weights.T).transpose(1, 2, 0)


def _background(rng: np.random.Generator, grid: Grid, size: int) -> np.ndarray:
    """Gradient + low-frequency noise + clutter (ellipses, lines) that belongs to no object class."""
    yy, xx = grid
    start, end = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    t = ((xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))) / size + 1.0) / 2.0
    image = start + (end - start) * t[..., None] + _smooth_noise(rng, size, int(rng.integers(3, 7)), 25.0)
    for _ in range(int(rng.integers(0, 3))):
        if rng.uniform() < 0.5:
            length = size * rng.uniform(0.08, 0.25)
            u, v = _rotated(grid, *rng.uniform(0.0, size, 2), rng.uniform(0.0, np.pi))
            inside = (u / length) ** 2 + (v * rng.uniform(2.5, 5.0) / length) ** 2 <= 1.0
        else:
            y0, x0, y1, x1 = (float(c) for c in rng.uniform(0.0, size, 4))
            dy, dx = y1 - y0, x1 - x0
            along = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1.0), 0.0, 1.0)
            half_width = size * rng.uniform(0.008, 0.02) + 0.5
            inside = (yy - y0 - along * dy) ** 2 + (xx - x0 - along * dx) ** 2 <= half_width**2
            u, v = _rotated(grid, y0, x0, np.arctan2(dy, dx))
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        base = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        _paint(rng, image, inside, texture, (u, v), size, base, _contrast_colour(rng, base))
    return image


def _void_border(labels: np.ndarray, radius: int) -> np.ndarray:
    """Set to void every pixel whose (2r+1)^2 neighbourhood holds another label (VOC-style outlines)."""
    size_y, size_x = labels.shape
    padded = np.pad(labels, radius, mode="edge")
    boundary = np.zeros(labels.shape, dtype=bool)
    for oy in range(2 * radius + 1):
        for ox in range(2 * radius + 1):
            boundary |= padded[oy:oy + size_y, ox:ox + size_x] != labels
    return np.where(boundary, np.uint8(IGNORE_INDEX), labels)


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one sample: an (S, S, 3) uint8 RGB image and its (S, S) uint8 VOC label map."""
    grid = tuple(np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5))
    image = _background(rng, grid, size)
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 4))):
        label = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        shape, texture = CLASS_DESIGN[label]
        radius = size * rng.uniform(0.35, 0.65) / 2.0
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        local = _rotated(grid, cy, cx, rng.uniform(-np.pi, np.pi))
        inside = _SHAPE_MASKS[shape](local[0] / radius, local[1] / radius)
        _paint(rng, image, inside, texture, local, size, *_family_colours(rng, SHAPES.index(shape)))
        labels[inside] = label
    image = image + 3.0 * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, _void_border(labels, max(1, size // 128))


def generate(out: str | os.PathLike, num_train: int, num_val: int, size: int, seed: int) -> pathlib.Path:
    """Write the dataset into `out` (created if missing) and return it; same arguments, same bytes."""
    _check_args(num_train, num_val, size, seed)
    out = pathlib.Path(out)
    images, masks, lists = out / "JPEGImages", out / "SegmentationClass", out / "ImageSets" / "Segmentation"
    for folder in (images, masks, lists):
        folder.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    split_ids: dict[str, list[str]] = {"train": [], "val": []}
    number = 0
    for split, count in (("train", num_train), ("val", num_val)):
        for index in range(count):
            number += 1
            sample_id = f"{ID_PREFIX}{number:06d}"
            image, labels = render(np.random.default_rng([seed, _SPLIT_KEYS[split], index]), size)
            Image.fromarray(image).save(images / f"{sample_id}.jpg", "JPEG", quality=JPEG_QUALITY)
            mask = Image.fromarray(labels)
            mask.putpalette(palette)
            mask.save(masks / f"{sample_id}.png", "PNG")
            split_ids[split].append(sample_id)
    split_ids["trainval"] = split_ids["train"] + split_ids["val"]
    for split, ids in split_ids.items():
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="ascii", newline="\n")
    return out


def ensure_synthetic(root: str | os.PathLike, num_train: int, num_val: int, size: int, seed: int) -> pathlib.Path:
    """Generate the dataset into `root` once and reuse it afterwards (safe across parallel processes).

    Generation goes to a hidden sibling folder that is renamed into place with its `.complete`
    marker, so an interrupted run never leaves a half-written `root`. A `root` generated with
    other arguments is an error rather than silently reused.
    """
    wanted = _check_args(num_train, num_val, size, seed)
    root = pathlib.Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        marker = root / MARKER
        if marker.is_file():
            found = json.loads(marker.read_text(encoding="utf-8"))
            if found != wanted:
                raise ValueError(f"built-in dataset folder {root} was generated with {found}, "
                                 f"not the requested {wanted}; delete it or use another folder")
            return root
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"{root} exists but is not a complete built-in dataset "
                                  f"(no {MARKER} marker); delete it or use another folder")
        for stale in root.parent.glob(f".{root.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = root.parent / f".{root.name}.partial-{uuid.uuid4().hex}"
        start = time.perf_counter()
        try:
            generate(partial, num_train, num_val, size, seed)
            (partial / MARKER).write_text(json.dumps(wanted, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(partial, root)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        print(f"kdseg: generated built-in dataset ({num_train} train / {num_val} val, {size}px, seed {seed}) "
              f"in {root} in {time.perf_counter() - start:.1f}s", flush=True)
    return root


def _int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write (or reuse) a built-in dataset folder, e.g. to pre-build it before a sweep."""
    parser = argparse.ArgumentParser(prog="python -m kdseg.data.synthetic", description=main.__doc__)
    parser.add_argument("--out", required=True, type=pathlib.Path, help="dataset folder (VOC2012 layout)")
    parser.add_argument("--train", required=True, type=_int_at_least(1), help="number of training images")
    parser.add_argument("--val", required=True, type=_int_at_least(1), help="number of validation images")
    parser.add_argument("--size", required=True, type=_int_at_least(MIN_SIZE), help="image side in pixels")
    parser.add_argument("--seed", default=0, type=_int_at_least(0), help="generator seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        root = ensure_synthetic(args.out, args.train, args.val, args.size, args.seed)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"error: {error}") from None
    print(root)


if __name__ == "__main__":
    main()
