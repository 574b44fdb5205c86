"""Adaptive inter-class similarity distillation, AICSD (Mansourian et al., 2023), as in AmirMansurian/AICSD.

Two losses on the logits and a schedule that mixes them with the cross-entropy:

- ICSD: each class channel of each image is a distribution over the H*W positions,
  softmax(z_c / T). The inter-class similarity matrix has entry (i, j) = KL(p_j || p_i)
  averaged over the batch for i <= j, mirrored below the diagonal (the reference fills
  ``ICS[i, j] = ICS[j, i] = kl(i, j)`` for j >= i); its rows are L2-normalised, and the loss
  is mean((ICS_s - ICS_t)^2) / B (the reference's ``lo_loss``);
- PI: per-pixel KL(softmax(z_t / T) || softmax(z_s / T)) summed over classes and divided by
  the number of logits B*C*H*W (``nn.KLDivLoss()``'s default ``mean``, the reference's ``pi_loss``);
- ALW (adaptive loss weighting, ``train_kd.py``; commented in at HEAD, behind ``--ALW`` in
  commit c634e3e): ``L = a * (CE + l_ics * ICSD) + (1 - a) * l_pi * PI`` with ``a = epoch / 120``,
  epochs counted from 0 and 120 the authors' number of epochs; here ``a = (epoch - 1) / epochs``
  (kdseg counts from 1), so a = 0 in the first epoch (teacher only) and grows linearly. kdseg's
  cross-entropy has weight 1, so with ``alw`` this term adds ``(a - 1) * CE`` itself (the same
  cross-entropy: void pixels left out, 0 when a batch has none labelled, not scaled by the
  term's ``weight``), which makes the total the authors' ``a * CE + ...``. Without ``alw`` it is
  ``l_ics * ICSD + l_pi * PI`` (ICSD and PI without the schedule).

Two places do not follow the HEAD code, because it contradicts its own README, paper and
history there: it applies the spatial softmax to the 4-D output along dim 2, the height axis
alone (commit 320eea1; the earlier commits flatten H*W first, as paper and README describe),
and it passes probabilities where ``KLDivLoss`` expects log-probabilities; here the softmax
runs over the flattened H*W and the KL is a KL. The class count is the logits' (the reference
hard-codes 21). Weights: l_ics = 9500 and l_pi = 10, the README's AICSD command
(``--pa_lambda 9500 --pi_lambda 10 --ALW``; in the code the ICS loss is ``lo_lambda``), T = 1.
All pixels count, as in the reference (these two losses do not read labels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.data.classes import IGNORE_INDEX
from kdseg.losses.base import LOGITS, Progress, Term, check_positive


def _check(logits_s: Tensor, logits_t: Tensor) -> None:
    if logits_s.shape != logits_t.shape or logits_s.dim() != 4:
        raise ValueError(
            "AICSD loss: student and teacher logits must both be B x classes x H x W of one shape; "
            f"got student {tuple(logits_s.shape)} and teacher {tuple(logits_t.shape)}"
        )


def ics_matrix(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """C x C inter-class similarity: entry (i, j) = batch mean of KL(p_j || p_i) for i <= j, mirrored; rows L2-normalised."""
    b, c = logits.shape[:2]
    log_p = (logits.reshape(b, c, -1) / temperature).log_softmax(2)  # B x C x HW: each class a distribution over positions
    p = log_p.exp()
    # kl[i, j] = mean_b sum_x p_j(x) (log p_j(x) - log p_i(x))
    entropy_term = (p * log_p).sum(2).mean(0)  # C: sum_x p_j log p_j
    cross = torch.einsum("bjx,bix->ij", p, log_p) / b  # C x C: sum_x p_j log p_i
    kl = entropy_term[None, :] - cross
    upper = torch.triu(torch.ones(c, c, dtype=torch.bool, device=logits.device))
    ics = torch.where(upper, kl, kl.T)
    return F.normalize(ics, dim=1)


def ics_loss(logits_s: Tensor, logits_t: Tensor, temperature: float = 1.0) -> Tensor:
    """mean((ICS_s - ICS_t)^2) / B, in float32."""
    _check(logits_s, logits_t)
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        diff = ics_matrix(logits_s.to(dtype), temperature) - ics_matrix(logits_t.to(dtype), temperature)
        return diff.pow(2).mean() / logits_s.shape[0]


def pi_kl_loss(logits_s: Tensor, logits_t: Tensor, temperature: float = 1.0) -> Tensor:
    """sum of the per-pixel KL(p_t || p_s) over the batch / (B*C*H*W), in float32 (``nn.KLDivLoss()``)."""
    _check(logits_s, logits_t)
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        log_p_s = (logits_s.to(dtype) / temperature).log_softmax(1)
        log_p_t = (logits_t.to(dtype) / temperature).log_softmax(1)
        return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / logits_s.numel()


def labelled_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy averaged over labelled pixels, as the Distiller's; 0 (zero gradient) when none is labelled."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    count = (labels != ignore_index).sum()
    return per_pixel.sum() / count.clamp(min=1)


def alw_alpha(progress: Progress) -> float:
    """The adaptive weight a = (epoch - 1) / epochs (the authors' epoch / 120 with 0-based epochs)."""
    return (progress.epoch - 1) / progress.epochs


class AICSDLoss(Term):
    """``weight * (a * l_ics * ICSD + (1 - a) * l_pi * PI) + (a - 1) * CE`` with ALW,
    else ``weight * (l_ics * ICSD + l_pi * PI)``.

    ``weight`` scales the distillation parts only: the ``(a - 1) * CE`` that turns kdseg's
    cross-entropy into the authors' ``a * CE`` is the schedule's and stays as it is.
    """

    name = "aicsd"

    def __init__(
        self,
        weight: float,
        tap: str = LOGITS,
        ics_weight: float = 9500.0,
        pi_weight: float = 10.0,
        temperature: float = 1.0,
        alw: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(weight, tap)
        self.ics_weight = check_positive(ics_weight, "ics_weight", strict=False)
        self.pi_weight = check_positive(pi_weight, "pi_weight", strict=False)
        self.temperature = check_positive(temperature, "temperature")
        self.alw = bool(alw)
        self.ignore_index = ignore_index

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        ics = self.ics_weight * ics_loss(feat_s, feat_t, self.temperature)
        pi = self.pi_weight * pi_kl_loss(feat_s, feat_t, self.temperature)
        if not self.alw:
            return ics + pi
        a = alw_alpha(self.progress)
        return a * ics + (1 - a) * pi

    def forward(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None, detach_teacher: bool = True) -> Tensor:
        distill = super().forward(feat_s, feat_t, masks, detach_teacher)
        if not self.alw:
            return distill
        if masks is None:
            raise ValueError("AICSD's adaptive weighting needs the batch's labels (it rescales the cross-entropy)")
        dtype = torch.promote_types(feat_s.dtype, torch.float32)
        with torch.autocast(device_type=feat_s.device.type, enabled=False):
            ce = labelled_cross_entropy(feat_s.to(dtype), masks, self.ignore_index)
        return distill + (alw_alpha(self.progress) - 1) * ce

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ics_weight={self.ics_weight:g}, pi_weight={self.pi_weight:g}, "
            f"temperature={self.temperature:g}, alw={self.alw}"
        )
