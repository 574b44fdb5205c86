"""Evaluation-time inference: whole image, sliding window, multi-scale + flip (mmseg's test modes).

:func:`predict` turns a batch of normalised images into per-pixel class scores as the ``eval``
config says. ``whole`` runs the model once on the whole image: the default single view is
``model(images)`` as kdseg always evaluated (the val loader pads batches to a multiple of 16);
rescaled views are padded bottom/right with 0 (the normalised mean) to a multiple of 16 and
their logits cropped back. ``slide`` runs it on
``crop``-sized windows every ``stride`` pixels and averages the logits where windows overlap,
as mmseg's ``slide_inference``. ``scales`` / ``flip`` add test-time augmentation on top of
either: each view's logits are resized back to the input size and the views' softmax
probabilities are averaged, as mmseg's ``aug_test`` / ``SegTTAModel`` do.

All functions return *logits*: scores whose softmax is the predicted class distribution.
With one view (``scales=[1.0]``, no flip) that is the model's own output, untouched; with
several it is ``log(mean of the views' probabilities)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdseg.errors import ConfigError
from kdseg.models import INPUT_MULTIPLE, input_multiple

MODES = ("whole", "slide")

Pair = tuple[int, int]


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Offsets of the sliding windows along one axis of length ``size``.

    One window every ``stride`` pixels, the last one moved back to end at the far edge, so
    every pixel is covered (mmseg's grid); a single window at 0 when ``size <= crop``.
    E.g. ``size=5, crop=3, stride=2`` -> ``[0, 2]``; ``size=6`` -> ``[0, 2, 3]``.
    """
    if size <= crop:
        return [0]
    count = -(-(size - crop) // stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def _pair(value: int | Sequence[int], name: str) -> Pair:
    """``512`` or ``[512, 1024]`` -> ``(height, width)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be an integer or [height, width] integers, got {value!r}")
    return items[0], items[1]


def _pad_to(images: Tensor, height: int, width: int) -> Tensor:
    """Pad bottom/right with 0 (the normalised mean colour, as ``pad_collate``) up to height x width."""
    pad_h, pad_w = max(height - images.shape[-2], 0), max(width - images.shape[-1], 0)
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def whole_inference(model: nn.Module, images: Tensor, size_divisor: int = INPUT_MULTIPLE) -> Tensor:
    """The model on the whole image, padded to a multiple of ``size_divisor``, logits cropped back.

    Inputs whose sides already are multiples of ``size_divisor`` go to the model unchanged.
    """
    h, w = images.shape[-2:]
    padded = _pad_to(images, -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor)
    logits = model(padded)
    return logits if padded is images else logits[..., :h, :w]


def slide_inference(
    model: nn.Module,
    images: Tensor,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    size_divisor: int = INPUT_MULTIPLE,
) -> Tensor:
    """Logits from ``crop``-sized windows every ``stride`` pixels, averaged where they overlap.

    ``crop`` and ``stride`` are an int or ``(height, width)``. Windows follow
    :func:`window_starts` on each axis (the last aligned to the far edge). An image smaller
    than the crop is padded with 0 to the crop and the logits are cropped back, so every
    model input is exactly ``crop`` (a multiple of ``size_divisor``). The result is float32
    (sums of the windows' logits / how many windows cover each pixel); the number of classes
    is read from the model's output.
    """
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride")
    if crop_h < size_divisor or crop_w < size_divisor or crop_h % size_divisor or crop_w % size_divisor:
        raise ValueError(f"crop must be a positive multiple of {size_divisor} on both sides, got {(crop_h, crop_w)}")
    if not (0 < stride_h <= crop_h and 0 < stride_w <= crop_w):
        raise ValueError(f"stride must satisfy 0 < stride <= crop on both sides, got stride {(stride_h, stride_w)}, crop {(crop_h, crop_w)}")
    h, w = images.shape[-2:]
    padded = _pad_to(images, crop_h, crop_w)
    height, width = padded.shape[-2:]
    total: Tensor | None = None
    count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=images.device)
    for y in window_starts(height, crop_h, stride_h):
        for x in window_starts(width, crop_w, stride_w):
            logits = model(padded[..., y : y + crop_h, x : x + crop_w]).float()
            if total is None:
                total = logits.new_zeros((images.shape[0], logits.shape[1], height, width))
            total[..., y : y + crop_h, x : x + crop_w] += logits
            count[..., y : y + crop_h, x : x + crop_w] += 1
    return (total / count)[..., :h, :w]


def scaled_size(height: int, width: int, scale: float) -> Pair:
    """The image size at ``scale``, rounded to the nearest pixel (at least 1), as mmseg's resize."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def multiscale_flip_inference(
    model: nn.Module,
    images: Tensor,
    scales: Sequence[float],
    flip: bool,
    base: Callable[[nn.Module, Tensor], Tensor] = whole_inference,
) -> Tensor:
    """Test-time augmentation: ``base`` on every scale (and its horizontal mirror), averaged.

    Each view is the image resized bilinearly (``align_corners=False``) to
    :func:`scaled_size`; ``base`` (whole-image or sliding-window inference) gives its logits,
    which are un-mirrored and resized back to the input size. The views' softmax
    probabilities are averaged (mmseg's ``aug_test``) and returned as their log, i.e. logits
    of the averaged distribution. With the single view ``scales=[1.0]``, ``flip=False`` the
    result is ``base(model, images)`` itself.
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of numbers > 0, got {list(scales)}")
    if list(scales) == [1.0] and not flip:
        return base(model, images)
    h, w = images.shape[-2:]
    probs: Tensor | None = None
    views = 0
    for scale in scales:
        size = scaled_size(h, w, scale)
        scaled = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            logits = base(model, scaled.flip(-1) if mirrored else scaled).float()
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            view = logits.softmax(1)
            probs = view if probs is None else probs + view
            views += 1
    return (probs / views).log()


@dataclass(frozen=True)
class EvalSettings:
    """A validated ``eval`` config: ``mode`` (whole | slide), window ``crop`` / ``stride``, ``scales``, ``flip``."""

    mode: str = "whole"
    crop: Pair | None = None
    stride: Pair | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    @property
    def one_view(self) -> bool:
        """No test-time augmentation: the image at its own size, not mirrored."""
        return list(self.scales) == [1.0] and not self.flip

    def describe(self) -> str:
        """One line for logs, e.g. ``whole`` or ``slide 512x512 / 341x341, scales 0.5, 1, 1.5, flip``."""
        text = self.mode
        if self.mode == "slide":
            text += f" {self.crop[0]}x{self.crop[1]} / {self.stride[0]}x{self.stride[1]}"
        if list(self.scales) != [1.0]:
            text += f", scales {', '.join(f'{s:g}' for s in self.scales)}"
        return text + (", flip" if self.flip else "")


def _bad(key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"config eval.{key}={value!r}: expected {expected}")


def _config_pair(value: Any, key: str) -> Pair:
    try:
        return _pair(value, key)
    except ValueError:
        raise _bad(key, value, "an integer or [height, width] integers") from None


def eval_settings(node: Mapping | EvalSettings | None) -> EvalSettings:
    """Validate an ``eval`` config node; ``None`` is whole-image, single-view evaluation.

    Raises :class:`~kdseg.errors.ConfigError` naming the ``eval.*`` key, its value and what
    was expected. ``eval.stride: null`` is two thirds of the crop, rounded down (mmseg's
    512 / 341). ``crop`` and ``stride`` are checked whenever they are set; ``slide`` needs a crop.
    """
    if node is None:
        return EvalSettings()
    if isinstance(node, EvalSettings):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    mode = node.get("mode", "whole")
    if mode not in MODES:
        raise _bad("mode", mode, f"one of {', '.join(MODES)}")
    crop, stride = node.get("crop"), node.get("stride")
    if crop is None:
        if mode == "slide":
            raise _bad("crop", crop, "the sliding window size (an integer or [height, width]) for eval.mode=slide")
        if stride is not None:
            raise _bad("stride", stride, "null when eval.crop is null")
    else:
        crop = _config_pair(crop, "crop")
        if any(c < INPUT_MULTIPLE or c % INPUT_MULTIPLE for c in crop):
            raise _bad("crop", node.get("crop"), f"a multiple of {INPUT_MULTIPLE} (the model input size of each window; DeepLabV3+ needs multiples of {INPUT_MULTIPLE})")
        stride = tuple(c * 2 // 3 for c in crop) if stride is None else _config_pair(stride, "stride")
        if not all(0 < s <= c for s, c in zip(stride, crop)):
            raise _bad("stride", node.get("stride"), f"0 < stride <= eval.crop ({node.get('crop')!r})")
    scales = node.get("scales", [1.0])
    numbers = isinstance(scales, Sequence) and not isinstance(scales, str) and len(scales) > 0 and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales
    )
    if not numbers:
        raise _bad("scales", scales, "a non-empty list of numbers > 0, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")
    flip = node.get("flip", False)
    if not isinstance(flip, bool):
        raise _bad("flip", flip, "true or false")
    return EvalSettings(mode, crop, stride, tuple(float(s) for s in scales), flip)


def predict(model: nn.Module, images: Tensor, cfg_eval: Mapping | EvalSettings | None = None) -> Tensor:
    """Logits for a batch of images under the ``eval`` config (``None``: whole image, one view).

    The default (``whole``, ``scales=[1.0]``, no flip) is ``model(images)``, the evaluation
    kdseg always did: the input goes to the model as it is (the val loader's ``pad_collate``
    already padded it to a multiple of 16).
    """
    settings = eval_settings(cfg_eval)
    if settings.mode == "whole" and settings.one_view:
        return model(images)
    divisor = math.lcm(INPUT_MULTIPLE, input_multiple(model))  # 16 for DeepLabV3+, 32 for a SegFormer, ...
    if settings.mode == "slide":
        base = partial(slide_inference, crop=settings.crop, stride=settings.stride, size_divisor=divisor)
    else:
        base = partial(whole_inference, size_divisor=divisor)
    return multiscale_flip_inference(model, images, settings.scales, settings.flip, base)
