"""Pair-wise distillation loss (pa): global structure of the encoder output.

Implements METHOD.md, section "Pair-wise loss (pa)": max-pool both feature maps
into a coarse grid of nodes, L2-normalise each node's channel vector with the
norm held constant in back-propagation (as the reference does), build the
N x N cosine-similarity matrix per image and compare teacher and student with
a squared error summed over node pairs, divided by N^2 and by the batch size.

The pooling kernel is a fraction ``scale`` of the map (the paper's and SKD's original
form), or, with ``kernel=k``, an absolute k x k window (CIRKD's SKD reimplementation uses
``k = 2``; it matches CIRKD's SKD in its pooling only: CIRKD's ``F.normalize`` back-propagates
through the node norm, which this term holds constant as the paper does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.errors import ConfigError
from kdseg.losses.base import Term

NORM_EPS = 1e-8


def _check_scale(scale: float) -> None:
    if not 0.0 < scale <= 1.0:
        raise ConfigError(f"pair-wise loss: pa_scale must be in (0, 1], got {scale}")


def _check_kernel(kernel: int | None) -> None:
    if kernel is not None and (isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1):
        raise ConfigError(f"pair-wise loss: kernel must be null (use scale) or an integer >= 1, got {kernel!r}")


def pairwise_kernel(h: int, w: int, scale: float = 0.5, kernel: int | None = None) -> tuple[int, int]:
    """Max-pool kernel (= stride) for an ``h x w`` map: ``(floor(h * scale), floor(w * scale))``,
    or ``(kernel, kernel)`` when an absolute kernel is given.

    Raises a ValueError instead of letting PyTorch fail on a zero-sized or oversized kernel.
    """
    _check_kernel(kernel)
    if kernel is not None:
        if kernel > min(h, w):
            raise ValueError(
                f"pair-wise loss: feature map {h}x{w} is smaller than the pooling kernel={kernel}; "
                "use a larger crop or a smaller kernel"
            )
        return kernel, kernel
    _check_scale(scale)
    kh, kw = math.floor(h * scale), math.floor(w * scale)
    if kh < 1 or kw < 1:
        raise ValueError(
            f"pair-wise loss: feature map {h}x{w} is too small to pool with pa_scale={scale} "
            f"(kernel would be {kh}x{kw}); use a larger crop or a larger scale"
        )
    return kh, kw


def pairwise_nodes(h: int, w: int, scale: float = 0.5, kernel: int | None = None) -> tuple[int, int]:
    """Grid of nodes ``(h', w')`` that pooling an ``h x w`` map gives, N = h' * w'.

    With kernel = stride = k, no padding and ``ceil_mode=True``, PyTorch's output
    size is ``ceil(h / k)`` (its rule that the last window must start inside the
    input never drops a window here): 33x33 -> 3x3, 32x32 and 16x16 -> 2x2.
    """
    kh, kw = pairwise_kernel(h, w, scale, kernel)
    return -(-h // kh), -(-w // kw)


def _similarity(feat: Tensor) -> Tensor:
    """Cosine-similarity matrix ``A = F^T F`` (B x N x N) of pooled nodes, norm detached."""
    norm = torch.linalg.vector_norm(feat, dim=1, keepdim=True).detach() + NORM_EPS
    nodes = (feat / norm).flatten(2)
    return nodes.transpose(1, 2) @ nodes


def pairwise_loss(
    feat_s: Tensor, feat_t: Tensor, scale: float = 0.5, detach_teacher: bool = True, kernel: int | None = None
) -> Tensor:
    """Unweighted pair-wise loss between student and teacher maps (B x C x H x W).

    Channel counts may differ (only the N x N matrices are compared); batch and
    spatial sizes must match. The teacher map is detached unless
    ``detach_teacher=False`` (the reference code's gradient flow into the teacher).
    The result is float32 (float64 for float64 inputs, so that gradcheck works),
    also under autocast: the maps are max-pooled in their own dtype (exact: max
    commutes with the upcast) and only the small pooled nodes are cast.
    """
    if feat_s.dim() != 4 or feat_t.dim() != 4 or (
        feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]
    ):
        raise ValueError(
            "pair-wise loss: student and teacher maps must be B x C x H x W with the same "
            f"B, H and W; got student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)}"
        )
    b, _, h, w = feat_t.shape
    kernel = pairwise_kernel(h, w, scale, kernel)
    dtype = torch.promote_types(torch.promote_types(feat_s.dtype, feat_t.dtype), torch.float32)
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        feat_t = feat_t.detach() if detach_teacher else feat_t
        pooled_s = F.max_pool2d(feat_s, kernel, kernel, padding=0, ceil_mode=True).to(dtype)
        pooled_t = F.max_pool2d(feat_t, kernel, kernel, padding=0, ceil_mode=True).to(dtype)
        n = pooled_t.shape[2] * pooled_t.shape[3]
        return (_similarity(pooled_t) - _similarity(pooled_s)).pow(2).sum() / n**2 / b


class PairwiseLoss(Term):
    """``weight * pairwise_loss`` on the maps both networks give at ``tap`` (the paper's pa, weight ``pa_lambda``)."""

    name = "pa"

    def __init__(
        self, weight: float, tap: str = "decoder.aspp.0.project.1", scale: float = 0.5, kernel: int | None = None
    ) -> None:
        super().__init__(weight, tap)
        _check_scale(scale)
        _check_kernel(kernel)
        self.scale = float(scale)
        self.kernel = kernel

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None) -> Tensor:
        return pairwise_loss(feat_s, feat_t, self.scale, detach_teacher=False, kernel=self.kernel)

    def extra_repr(self) -> str:
        pooling = f"kernel={self.kernel}" if self.kernel is not None else f"scale={self.scale}"
        return f"{super().extra_repr()}, {pooling}"
