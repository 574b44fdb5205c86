"""Channel-wise distillation, CWD (Shu et al., ICCV 2021).

Each channel's map is turned into a distribution over its H*W locations by a softmax of
x / T; the loss is KL(teacher || student) summed over channels and locations, divided by
N * C and multiplied by T^2 (CIRKD's ``CriterionCWD`` with ``norm_type='channel'``,
``divergence='kl'``). By default it reads the logits, with T = 4 and weight 3 (CIRKD's
logits setting).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.losses.base import LOGITS, Term, check_positive


def cwd_loss(feat_s: Tensor, feat_t: Tensor, temperature: float = 4.0) -> Tensor:
    """T^2 / (N * C) * sum over channels of KL(softmax_HW(t / T) || softmax_HW(s / T)), in float32."""
    if feat_s.shape != feat_t.shape or feat_s.dim() != 4:
        raise ValueError(
            "CWD loss: student and teacher maps must both be B x C x H x W of one shape; "
            f"got student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)}"
        )
    n, c = feat_s.shape[:2]
    dtype = torch.promote_types(feat_s.dtype, torch.float32)
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        log_p_s = F.log_softmax(feat_s.to(dtype).flatten(2) / temperature, dim=2)
        log_p_t = F.log_softmax(feat_t.to(dtype).flatten(2) / temperature, dim=2)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl / (n * c) * temperature**2


class CWDLoss(Term):
    """``weight * cwd_loss`` (default: on the logits, T = 4)."""

    name = "cwd"

    def __init__(self, weight: float, tap: str = LOGITS, temperature: float = 4.0) -> None:
        super().__init__(weight, tap)
        self.temperature = check_positive(temperature, "temperature")

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None) -> Tensor:
        return cwd_loss(feat_s, feat_t, self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:g}"
