"""Logits KD (Hinton et al., 2015) per pixel, as in CIRKD's ``losses/kd.py``.

Each pixel's class distribution is softened by a temperature T; the loss is the
Kullback-Leibler divergence KL(p_t || p_s) summed over classes, averaged over pixels
(``batchmean`` over the B*H*W rows), times T^2 so that gradients keep their scale as T
grows. :class:`KDLoss` leaves out pixels labelled 255 (void) from the mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.data.classes import IGNORE_INDEX
from kdseg.losses.base import LOGITS, Term, check_positive, valid_pixels


def pixel_kl(logits_s: Tensor, logits_t: Tensor, temperature: float = 1.0) -> Tensor:
    """B x H x W map of KL(softmax(z_t / T) || softmax(z_s / T)) over the class dimension, in float32."""
    if logits_s.shape != logits_t.shape or logits_s.dim() != 4:
        raise ValueError(
            "KD loss: student and teacher logits must both be B x classes x H x W of one shape; "
            f"got student {tuple(logits_s.shape)} and teacher {tuple(logits_t.shape)}"
        )
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        log_p_s = F.log_softmax(logits_s.to(dtype) / temperature, dim=1)
        log_p_t = F.log_softmax(logits_t.to(dtype) / temperature, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float = 1.0, valid: Tensor | None = None) -> Tensor:
    """T^2 * mean over pixels of the per-pixel KL(p_t || p_s); only pixels where ``valid`` if given."""
    kl = pixel_kl(logits_s, logits_t, temperature)
    if valid is not None:
        kl = kl[valid]
        if kl.numel() == 0:
            return kl.sum()  # no labelled pixel: 0, still part of the graph
    return kl.mean() * temperature**2


class KDLoss(Term):
    """``weight * kd_loss`` on the logits, void pixels (label 255) left out."""

    name = "kd"

    def __init__(self, weight: float, tap: str = LOGITS, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(weight, tap)
        self.temperature = check_positive(temperature, "temperature")
        self.ignore_index = ignore_index

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        valid = None if masks is None else valid_pixels(masks, feat_s.shape[-2:], self.ignore_index)
        return kd_loss(feat_s, feat_t, self.temperature, valid)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:g}"
