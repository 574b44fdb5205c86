"""Joint image + mask pipelines on ``torchvision.transforms.v2`` (METHOD.md training recipe).

Masks travel as ``tv_tensors.Mask`` so v2 resizes them with nearest-neighbour, pads them
with 255 ("void") and leaves them out of photometric transforms.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from kdseg.data.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_MODES = ("full", "center_crop")


def _normalize() -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_transforms(
    base_size: int,
    crop_size: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    blur_prob: float = 0.5,
) -> v2.Compose:
    """Reference train pipeline: flip, random scale-crop (pad 0 / 255), Gaussian blur, ImageNet norm.

    The short side is resized to a random size in ``scale_range`` x ``base_size``, then a
    ``crop_size`` square is cut at random (padding the image with 0 and the mask with 255
    where the scaled image is smaller than the crop).
    """
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < min <= max, got {list(scale_range)}")
    blur_kernel = max(3, (crop_size // 32) | 1)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomResize(int(lo * base_size), int(hi * base_size) + 1),
            v2.RandomCrop(
                crop_size,
                pad_if_needed=True,
                fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX, "others": 0},
            ),
            v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 1.0))], p=blur_prob),
            *_normalize(),
        ]
    )


def val_transforms(eval_mode: str = "full", base_size: int = 513, crop_size: int = 513) -> v2.Compose:
    """Validation pipeline: full resolution (``full``) or short-side resize + centre crop."""
    if eval_mode == "full":
        geometric: list[v2.Transform] = []
    elif eval_mode == "center_crop":
        geometric = [v2.Resize(base_size), v2.CenterCrop(crop_size)]
    else:
        raise ValueError(f"dataset.eval_mode must be one of {EVAL_MODES}, got '{eval_mode}'")
    return v2.Compose([v2.ToImage(), *geometric, *_normalize()])
