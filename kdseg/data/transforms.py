"""Joint image + mask pipelines on ``torchvision.transforms.v2`` (METHOD.md training recipe).

Masks travel as ``tv_tensors.Mask`` so they are resized with (centre-aligned) nearest-neighbour,
padded with 255 ("void") and left out of photometric transforms.
"""
from __future__ import annotations

from enum import Enum

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from kdseg.data.classes import IGNORE_INDEX
from kdseg.utils import choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EvalMode(str, Enum):
    """``dataset.eval_mode``: the val images' geometry."""

    full = "full"
    """every image at its own resolution"""
    center_crop = "center_crop"
    """short side resized to base_size, then a crop_size centre crop"""


_MASK_RESIZE = v2.InterpolationMode.NEAREST_EXACT
"""Pixel-centre-aligned nearest (as PIL's NEAREST). v2's default for masks, NEAREST, samples source
pixel ``floor(i * in / out)``, which shifts the labels by up to one output pixel against the
(centre-aligned) bilinear image."""


class _RandomResize(v2.RandomResize):
    """``v2.RandomResize`` that resizes masks with ``_MASK_RESIZE``."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return v2.functional.resize(inpt, params["size"], interpolation=_MASK_RESIZE)
        return super().transform(inpt, params)


class _Resize(v2.Resize):
    """``v2.Resize`` that resizes masks with ``_MASK_RESIZE``."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return v2.functional.resize(inpt, self.size, interpolation=_MASK_RESIZE, max_size=self.max_size)
        return super().transform(inpt, params)


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
            _RandomResize(int(lo * base_size), int(hi * base_size) + 1),
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
    geometric: list[v2.Transform] = []
    if choice(EvalMode, eval_mode, "dataset.eval_mode") is EvalMode.center_crop:
        if crop_size > base_size:
            # CenterCrop would pad the mask with 0 (background), inventing labels that count in mIoU.
            raise ValueError(
                f"dataset.eval_mode=center_crop needs crop_size <= base_size (the resized short side), "
                f"got crop_size={crop_size} > base_size={base_size}"
            )
        geometric = [_Resize(base_size), v2.CenterCrop(crop_size)]
    return v2.Compose([v2.ToImage(), *geometric, *_normalize()])
