"""Pixel-wise distillation loss (pi): detailed spatial information from the decoder.

Implements METHOD.md, section "Pixel-wise loss (pi)": an attention map (channel
mean of the squared activations), L2-normalised, compared with a mean squared
error. The default normalisation ``"height"`` reproduces the reference exactly:
it normalises the B x H x W map along dim 1, i.e. every (b, w) column along the
height axis. ``"spatial"`` normalises each image's whole H*W map instead (the
attention-transfer form).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.errors import ConfigError
from kdseg.losses.base import Term

NORMALIZE_MODES = ("height", "spatial")
NORM_EPS = 1e-12


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(
            f"pixel-wise loss: unknown normalize={normalize!r}; valid: {', '.join(NORMALIZE_MODES)}"
        )


def attention_map(feat: Tensor, normalize: str = "height", dtype: torch.dtype | None = None) -> Tensor:
    """Normalised attention map (B x H x W) of a B x C x H x W feature map, computed in ``dtype``.

    A lower-precision map (AMP) is reduced over channels in ``dtype`` by one fused norm, so only
    the small B x H x W map exists in float32, never an upcast copy of the whole feature map.
    """
    _check_normalize(normalize)
    dtype = dtype or feat.dtype
    if feat.dtype == dtype:
        att = feat.pow(2).mean(dim=1)
    else:
        att = torch.linalg.vector_norm(feat, 2, dim=1, dtype=dtype).pow(2) / feat.shape[1]
    if normalize == "height":
        return F.normalize(att, p=2, dim=1, eps=NORM_EPS)
    return F.normalize(att.flatten(1), p=2, dim=1, eps=NORM_EPS).view_as(att)


def pixelwise_loss(feat_s: Tensor, feat_t: Tensor, normalize: str = "height", detach_teacher: bool = True) -> Tensor:
    """Unweighted pixel-wise loss between student and teacher maps (B x C x H x W).

    Channel counts may differ (the attention map averages them); batch sizes must
    match. If the spatial sizes differ, the student's feature map is resized to
    the teacher's (bilinear, ``align_corners=False``) before its attention map is
    taken. The teacher map is detached unless ``detach_teacher=False`` (the
    reference code's gradient flow into the teacher). The result is float32
    (float64 for float64 inputs, so that gradcheck works), also under autocast.
    """
    _check_normalize(normalize)
    if feat_s.dim() != 4 or feat_t.dim() != 4 or feat_s.shape[0] != feat_t.shape[0]:
        raise ValueError(
            "pixel-wise loss: student and teacher maps must be B x C x H x W with the same B; "
            f"got student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(feat_s.dtype, feat_t.dtype), torch.float32)
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        if feat_s.shape[2:] != feat_t.shape[2:]:
            feat_s = F.interpolate(feat_s.to(dtype), size=feat_t.shape[2:], mode="bilinear", align_corners=False)
        att_s = attention_map(feat_s, normalize, dtype)
        att_t = attention_map(feat_t.detach() if detach_teacher else feat_t, normalize, dtype)
        return (att_t - att_s).pow(2).mean()


class PixelwiseLoss(Term):
    """``weight * pixelwise_loss`` on the maps both networks give at ``tap`` (the paper's pi, weight ``pi_lambda``)."""

    name = "pi"

    def __init__(self, weight: float, tap: str = "decoder.block2.1", normalize: str = "height") -> None:
        super().__init__(weight, tap)
        _check_normalize(normalize)
        self.normalize = normalize

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None) -> Tensor:
        return pixelwise_loss(feat_s, feat_t, self.normalize, detach_teacher=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize!r}"
