"""Decoupled knowledge distillation, DKD (Zhao et al., CVPR 2022), per pixel.

The reference code (megvii-research/mdistiller ``mdistiller/distillers/DKD.py``) splits KD at
each sample into two parts, with the label ``g`` naming the target class and softmax(z / T):

- TCKD: KL between the binary distributions (p_g, 1 - p_g) of teacher and student;
- NCKD: KL between the distributions over the non-target classes, renormalised (the
  reference subtracts 1000 from the target logit before a softmax; here the target class is
  left out exactly, the same value without the offset);

``loss = T^2 * (alpha * TCKD + beta * NCKD)``, summed over classes and averaged over samples.
Here a sample is a pixel whose label (nearest-resized to the logits) is not void; void pixels
have no target class and are left out of the mean. mdistiller also ramps the loss in
linearly over ``warmup`` epochs (``min(epoch / warmup, 1)``); ``warmup=0`` switches that off.
The defaults are the segmentation setting of seg-gdkd (ZaberKo/seg-gdkd, CIRKD's training
code with DKD, the one segmentation codebase found with one; CIRKD and Af-DCD ship none):
alpha = 1, beta = 2, T = 1, weight 1 (``--lambda-kd``), no warm-up; mdistiller's CIFAR-100
defaults (beta = 8, T = 4, warmup = 20) are for classification.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.data.classes import IGNORE_INDEX
from kdseg.errors import ConfigError
from kdseg.losses.base import LOGITS, Term, check_positive, labels_at


def dkd_parts(logits_s: Tensor, logits_t: Tensor, target: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-sample TCKD and NCKD (not yet times T^2) of N x classes logits with N target classes."""
    z_s, z_t = logits_s / temperature, logits_t / temperature
    gt = F.one_hot(target, z_s.shape[1]).bool()
    log_norm_s, log_norm_t = z_s.logsumexp(1), z_t.logsumexp(1)
    others_s = z_s.masked_fill(gt, float("-inf"))
    others_t = z_t.masked_fill(gt, float("-inf"))
    # binary (target, rest) log-probabilities, without forming 1 - p_g
    binary_s = torch.stack([z_s[gt] - log_norm_s, others_s.logsumexp(1) - log_norm_s], 1)
    binary_t = torch.stack([z_t[gt] - log_norm_t, others_t.logsumexp(1) - log_norm_t], 1)
    tckd = F.kl_div(binary_s, binary_t, reduction="none", log_target=True).sum(1)
    log_q_s = others_s.log_softmax(1).masked_fill(gt, 0.0)
    log_q_t = others_t.log_softmax(1).masked_fill(gt, 0.0)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1)
    return tckd, nckd


def dkd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 2.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """T^2 * mean over labelled pixels of alpha * TCKD + beta * NCKD, in float32 (0 when no pixel is labelled)."""
    if logits_s.shape != logits_t.shape or logits_s.dim() != 4:
        raise ValueError(
            "DKD loss: student and teacher logits must both be B x classes x H x W of one shape; "
            f"got student {tuple(logits_s.shape)} and teacher {tuple(logits_t.shape)}"
        )
    classes = logits_s.shape[1]
    labels = labels_at(labels, logits_s.shape[-2:])
    valid = (labels != ignore_index) & (labels >= 0) & (labels < classes)
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        z_s = logits_s.to(dtype).movedim(1, -1)[valid]
        z_t = logits_t.to(dtype).movedim(1, -1)[valid]
        if z_s.shape[0] == 0:
            return logits_s.to(dtype).sum() * 0.0  # no labelled pixel: 0 with a zero gradient
        tckd, nckd = dkd_parts(z_s, z_t, labels[valid], temperature)
        return temperature**2 * (alpha * tckd + beta * nckd).mean()


class DKDLoss(Term):
    """``weight * min(epoch / warmup, 1) * dkd_loss`` on the logits; labels give each pixel's target class."""

    name = "dkd"

    def __init__(
        self,
        weight: float,
        tap: str = LOGITS,
        alpha: float = 1.0,
        beta: float = 2.0,
        temperature: float = 1.0,
        warmup: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(weight, tap)
        self.alpha = check_positive(alpha, "alpha", strict=False)
        self.beta = check_positive(beta, "beta", strict=False)
        self.temperature = check_positive(temperature, "temperature")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"warmup={warmup!r}: expected a whole number of epochs >= 0")
        self.warmup = warmup
        self.ignore_index = ignore_index

    def ramp(self) -> float:
        """mdistiller's warm-up factor at the current epoch (1 when ``warmup`` is 0)."""
        return min(self.progress.epoch / self.warmup, 1.0) if self.warmup else 1.0

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        if masks is None:
            raise ValueError("DKD loss needs the batch's labels (they name each pixel's target class)")
        return self.ramp() * dkd_loss(feat_s, feat_t, masks, self.alpha, self.beta, self.temperature, self.ignore_index)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha:g}, beta={self.beta:g}, "
            f"temperature={self.temperature:g}, warmup={self.warmup}"
        )
