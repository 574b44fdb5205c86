"""The qualitative figure (like the paper's): input, ground truth, teacher, baseline and distilled student.

    python -m kdseg.figure --root DATA_ROOT --teacher T.pt --baseline B.pt --distilled D.pt --out fig.png
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from kdseg.checkpoint import load_model
from kdseg.data import pad_collate
from kdseg.data.transforms import val_transforms
from kdseg.data.voc import VOCSegmentation
from kdseg.viz import save_prediction_grid


def qualitative_figure(
    out: str | os.PathLike,
    root: str | os.PathLike,
    checkpoints: Sequence[tuple[str, str | os.PathLike]],
    k: int = 6,
    val_list: str = "ImageSets/Segmentation/val.txt",
    mask_dir: str = "SegmentationClass",
) -> Path:
    """Predictions of each (label, checkpoint) on the first ``k`` val images, one row each."""
    dataset = VOCSegmentation(root, val_list, mask_dir=mask_dir, transforms=val_transforms("full"))
    images, masks = pad_collate([dataset[i] for i in range(min(k, len(dataset)))])
    rows = [("ground truth", masks)]
    for label, path in checkpoints:
        model, ckpt = load_model(path)
        model.eval()
        with torch.no_grad():
            pred = model(images).argmax(1)
        rows.append((f"{label}\n{100 * ckpt['metrics']['miou']:.1f}% mIoU", pred))
    return save_prediction_grid(out, images, rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdseg.figure", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset folder in VOC layout")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--baseline", required=True, help="student trained with CE only")
    parser.add_argument("--distilled", required=True, help="student trained with distillation")
    parser.add_argument("--out", default="qualitative.png")
    parser.add_argument("--k", type=int, default=6, help="number of val images")
    args = parser.parse_args(argv)
    path = qualitative_figure(
        args.out, args.root,
        [("teacher", args.teacher), ("baseline student", args.baseline), ("distilled student", args.distilled)], args.k,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
