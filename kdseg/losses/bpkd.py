"""Boundary-privileged knowledge distillation, BPKD (Liu et al., WACV 2024), on the logits.

The authors released no training code (AkideLiu/BPKD holds evaluation configs only), and
kdseg could not read the paper's equations while writing this; the module implements this
reading of the paper's method section, stated so that it can be checked against it:

- regions from the labels (nearest-resized to the logits): a pixel is an *edge* pixel when its
  ``kernel`` x ``kernel`` window holds a label other than its own (the ground-truth
  boundaries dilated by the kernel; void counts as a label there, so object/void borders are
  edges); every other pixel is *body*; void pixels belong to neither loss;
- edge loss: pixel-wise KD on the edge pixels, T_e^2 * mean over edge pixels of
  KL(softmax(z_t / T_e) || softmax(z_s / T_e)) over the classes (telling ambiguous classes
  apart at each edge pixel);
- body loss: channel-wise distillation restricted to the body, each class channel of each
  image a distribution over its body pixels, softmax(z_c / T_b); T_b^2 * sum over channels of
  KL(teacher || student) / (images with a body pixel * C) (the shape of each class's region);
- ``loss = edge_weight * edge + body_weight * body``.

Defaults are kdseg's, not the paper's: the two parts at the settings of the losses they
specialise in CIRKD (KD: weight 1, T = 1; CWD on logits: weight 3, T = 4) and a 5 x 5 window.
A batch without labelled pixels gives 0 with a zero gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.data.classes import IGNORE_INDEX
from kdseg.errors import ConfigError
from kdseg.losses.base import LOGITS, Term, check_positive, labels_at

MASKED_LOGIT = -1e30
"""Stands in for the logits outside the body in the spatial softmax: exp of it is exactly 0, and it stays finite."""


def edge_mask(labels: Tensor, kernel: int = 5) -> Tensor:
    """B x H x W: pixels whose ``kernel`` x ``kernel`` window (odd size, clipped at the image border) holds another label."""
    x = labels[:, None].float()
    pad = kernel // 2
    highest = F.max_pool2d(x, kernel, stride=1, padding=pad)
    lowest = -F.max_pool2d(-x, kernel, stride=1, padding=pad)
    return ((highest != x) | (lowest != x))[:, 0]


def edge_kd(logits_s: Tensor, logits_t: Tensor, region: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * mean over the pixels of ``region`` of the per-pixel KL(p_t || p_s); 0 for an empty region."""
    log_p_s = (logits_s / temperature).log_softmax(1).movedim(1, -1)[region]
    log_p_t = (logits_t / temperature).log_softmax(1).movedim(1, -1)[region]
    if log_p_s.shape[0] == 0:
        return logits_s.sum() * 0.0
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean() * temperature**2


def body_cwd(logits_s: Tensor, logits_t: Tensor, region: Tensor, temperature: float = 4.0) -> Tensor:
    """T^2 / (images with a pixel in ``region`` * C) * sum of the channel-wise KL over ``region``; 0 for an empty region."""
    c = logits_s.shape[1]
    inside = region.flatten(1)[:, None, :]  # B x 1 x HW
    fill = logits_s.new_tensor(MASKED_LOGIT)
    log_p_s = torch.where(inside, logits_s.flatten(2) / temperature, fill).log_softmax(2)
    log_p_t = torch.where(inside, logits_t.flatten(2) / temperature, fill).log_softmax(2)
    kl = torch.where(inside, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(log_p_s))
    images = region.flatten(1).any(1).sum()
    if images == 0:
        return logits_s.sum() * 0.0
    return kl.sum() / (images * c) * temperature**2


def bpkd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    labels: Tensor,
    edge_weight: float = 1.0,
    body_weight: float = 3.0,
    edge_temperature: float = 1.0,
    body_temperature: float = 4.0,
    kernel: int = 5,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``edge_weight * edge_kd + body_weight * body_cwd`` with the regions from ``labels``, in float32."""
    if logits_s.shape != logits_t.shape or logits_s.dim() != 4:
        raise ValueError(
            "BPKD loss: student and teacher logits must both be B x classes x H x W of one shape; "
            f"got student {tuple(logits_s.shape)} and teacher {tuple(logits_t.shape)}"
        )
    labels = labels_at(labels, logits_s.shape[-2:])
    valid = labels != ignore_index
    edges = edge_mask(labels, kernel)
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        z_s, z_t = logits_s.to(dtype), logits_t.to(dtype)
        edge = edge_kd(z_s, z_t, edges & valid, edge_temperature)
        body = body_cwd(z_s, z_t, ~edges & valid, body_temperature)
        return edge_weight * edge + body_weight * body


class BPKDLoss(Term):
    """``weight * bpkd_loss`` on the logits; the labels give the edge and body regions."""

    name = "bpkd"

    def __init__(
        self,
        weight: float,
        tap: str = LOGITS,
        edge_weight: float = 1.0,
        body_weight: float = 3.0,
        edge_temperature: float = 1.0,
        body_temperature: float = 4.0,
        kernel: int = 5,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(weight, tap)
        self.edge_weight = check_positive(edge_weight, "edge_weight", strict=False)
        self.body_weight = check_positive(body_weight, "body_weight", strict=False)
        self.edge_temperature = check_positive(edge_temperature, "edge_temperature")
        self.body_temperature = check_positive(body_temperature, "body_temperature")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 3 or kernel % 2 == 0:
            raise ConfigError(f"kernel={kernel!r}: expected an odd integer >= 3 (the edge window's size)")
        self.kernel = kernel
        self.ignore_index = ignore_index

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        if masks is None:
            raise ValueError("BPKD loss needs the batch's labels (they give the edge and body regions)")
        return bpkd_loss(
            feat_s, feat_t, masks, self.edge_weight, self.body_weight,
            self.edge_temperature, self.body_temperature, self.kernel, self.ignore_index,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, edge_weight={self.edge_weight:g}, body_weight={self.body_weight:g}, "
            f"edge_temperature={self.edge_temperature:g}, body_temperature={self.body_temperature:g}, kernel={self.kernel}"
        )
