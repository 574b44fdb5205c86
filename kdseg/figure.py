"""The qualitative figure (like the paper's): input, ground truth, teacher, baseline and distilled student.

    python -m kdseg.figure --root DATA_ROOT --teacher T.pt --baseline B.pt --distilled D.pt --out fig.png
    python -m kdseg.figure --dataset cityscapes --root CITYSCAPES_ROOT ...
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from kdseg.checkpoint import load_model
from kdseg.data import pad_collate
from kdseg.data.classes import dataset_classes
from kdseg.data.folders import LAYOUTS, folder_dataset
from kdseg.data.transforms import val_transforms
from kdseg.data.voc import VOCSegmentation
from kdseg.inference import whole_inference
from kdseg.models import INPUT_MULTIPLE, input_multiple
from kdseg.viz import save_prediction_grid


def qualitative_figure(
    out: str | os.PathLike,
    root: str | os.PathLike,
    checkpoints: Sequence[tuple[str, str | os.PathLike]],
    k: int = 6,
    val_list: str = "ImageSets/Segmentation/val.txt",
    mask_dir: str = "SegmentationClass",
    dataset: str = "voc",
) -> Path:
    """Predictions of each (label, checkpoint) on the first ``k`` val images, one row each.

    ``dataset``: ``voc`` (a VOC-layout ``root`` read through ``val_list`` and ``mask_dir``),
    ``cityscapes``, ``ade20k`` or ``camvid`` (their val folder); it also picks the palette.
    """
    transforms = val_transforms("full")
    if dataset in LAYOUTS:
        val_set = folder_dataset(dataset, root, LAYOUTS[dataset].val_split, transforms)
    else:
        val_set = VOCSegmentation(root, val_list, mask_dir=mask_dir, transforms=transforms)
    images, masks = pad_collate([val_set[i] for i in range(min(k, len(val_set)))])
    rows = [("ground truth", masks)]
    for label, path in checkpoints:
        model, ckpt = load_model(path)
        model.eval()
        with torch.no_grad():
            pred = whole_inference(model, images, math.lcm(INPUT_MULTIPLE, input_multiple(model))).argmax(1)
        rows.append((f"{label}\n{100 * ckpt['metrics']['miou']:.1f}% mIoU", pred))
    return save_prediction_grid(out, images, rows, palette=dataset_classes(dataset).palette)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdseg.figure", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset folder (in VOC layout for --dataset voc)")
    parser.add_argument("--dataset", default="voc", choices=["voc", *LAYOUTS], help="its layout, classes and palette")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--baseline", required=True, help="student trained with CE only")
    parser.add_argument("--distilled", required=True, help="student trained with distillation")
    parser.add_argument("--out", default="qualitative.png")
    parser.add_argument("--k", type=int, default=6, help="number of val images")
    args = parser.parse_args(argv)
    path = qualitative_figure(
        args.out, args.root,
        [("teacher", args.teacher), ("baseline student", args.baseline), ("distilled student", args.distilled)], args.k,
        dataset=args.dataset,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
