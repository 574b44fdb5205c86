"""Figures: palette colouring (VOC's by default) and prediction grids like the paper's qualitative figure."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kdseg.data.classes import voc_palette
from kdseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
GRID_GAP = 2
"""White pixels between the panels of a prediction grid."""


def colorize(mask: torch.Tensor | np.ndarray, palette: Sequence[int] | None = None) -> np.ndarray:
    """H x W class indices (255 = void) -> H x W x 3 uint8 in ``palette`` (flat 256 x [r, g, b]; default VOC's)."""
    colours = _PALETTE if palette is None else np.asarray(palette, dtype=np.uint8).reshape(256, 3)
    return colours[np.asarray(mask, dtype=np.int64).clip(0, 255)]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised 3 x H x W tensor -> H x W x 3 uint8 for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_prediction_grid(
    path: str | os.PathLike,
    images: torch.Tensor,
    rows: Sequence[tuple[str, torch.Tensor]],
    title: str | None = None,
    palette: Sequence[int] | None = None,
) -> Path:
    """One column per image; first row the inputs, then one labelled row per mask set.

    ``rows`` is e.g. ``[("ground truth", masks), ("teacher", pred_t), ("student", pred_s)]``,
    each a K x H x W tensor of class indices, drawn in ``palette`` (the dataset's; default VOC's).
    The panels are tiled into one picture (2-px white gaps) drawn on one axes, the row labels as
    its y tick labels: one image to lay out instead of a grid of axes, which every run writes.
    """
    plt = _pyplot()
    k = images.shape[0]
    panels = [("input", [denormalize(img) for img in images])]
    panels += [(label, [colorize(m.cpu(), palette) for m in masks]) for label, masks in rows]
    height, width = panels[0][1][0].shape[:2]
    gap, n = GRID_GAP, len(panels)
    canvas = np.full((n * height + (n - 1) * gap, k * width + (k - 1) * gap, 3), 255, dtype=np.uint8)
    for r, (_, pictures) in enumerate(panels):
        for c, picture in enumerate(pictures):
            top, left = r * (height + gap), c * (width + gap)
            canvas[top:top + height, left:left + width] = picture
    label_inches = 0.08 * max(len(line) for label, _ in panels for line in label.splitlines()) + 0.3  # 9-pt text
    fig, ax = plt.subplots(figsize=(1.6 * k + label_inches, 1.6 * n))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (height + gap) + height / 2 for r in range(n)], [label for label, _ in panels], fontsize=9)
    ax.tick_params(left=False)
    ax.set_anchor("E")  # the tiles to the right, the labels' room to the left
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_gain_figure(path: str | os.PathLike, rows: Sequence[dict], title: str | None = None,
                     labels: Sequence[str] | None = None) -> Path | None:
    """Paired gains over the baseline, one bar per distilled setting (mIoU points, the mean over
    seeds with its 95% t interval) with each seed's difference as a dot; rows as
    :func:`kdseg.report.summarize` gives them. A bar is green (red) when its interval lies above
    (below) 0, grey otherwise; a gain of one seed has no interval.

    ``labels``: one per row with a paired baseline (default: student + terms). None when no row has one.
    """
    plt = _pyplot()
    rows = [r for r in rows if r.get("gain_n")]
    if not rows:
        return None
    labels = list(labels) if labels is not None else [f"{r['student']} + {' + '.join(r['terms'])}" for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    for i, row in enumerate(rows):
        mean = 100 * row["gain_mean"]
        ci = 100 * row.get("gain_ci", math.nan)
        has_ci = math.isfinite(ci)
        ax.barh(i, mean, xerr=ci if has_ci else None, capsize=3, alpha=0.6,
                color="tab:green" if has_ci and mean - ci > 0 else "tab:red" if has_ci and mean + ci < 0 else "tab:gray")
        seeds = list(row["gain_by_seed"].values())
        ax.scatter([100 * d for d in seeds], [i] * len(seeds), color="black", s=12, zorder=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("val mIoU gain over the baseline, paired by seed (points)")
    ax.set_title(title or "mean with its 95% t interval over seeds; dots: seeds", fontsize=9)
    return _save(fig, path)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported when a figure is drawn: a second of start-up that
    runs without figures skip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; returns the path."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
