"""DIST (Huang et al., NeurIPS 2022): distillation from a stronger teacher by relations.

Per-pixel class probabilities ``softmax(z / T)`` of student and teacher are compared by
Pearson correlation, not by their values: across the classes of each pixel (inter-class
relation) and across the pixels of each class (intra-class relation). The loss is
``T^2 * (beta * (1 - mean inter correlation) + gamma * (1 - mean intra correlation))``; the
reference segmentation code (DIST_KD) uses beta = gamma = T = 1 and weight 1, on all pixels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdseg.losses.base import LOGITS, Term, check_positive

EPS = 1e-8


def pearson(x: Tensor, y: Tensor, eps: float = EPS) -> Tensor:
    """Row-wise Pearson correlation of two N x D matrices (cosine of the centred rows)."""
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)


def dist_loss(logits_s: Tensor, logits_t: Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> Tensor:
    """DIST's inter- plus intra-class relation loss on B x classes x H x W logits, in float32."""
    if logits_s.shape != logits_t.shape or logits_s.dim() != 4:
        raise ValueError(
            "DIST loss: student and teacher logits must both be B x classes x H x W of one shape; "
            f"got student {tuple(logits_s.shape)} and teacher {tuple(logits_t.shape)}"
        )
    classes = logits_s.shape[1]
    dtype = torch.promote_types(logits_s.dtype, torch.float32)
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        y_s = (logits_s.to(dtype) / temperature).softmax(1).movedim(1, -1).reshape(-1, classes)
        y_t = (logits_t.to(dtype) / temperature).softmax(1).movedim(1, -1).reshape(-1, classes)
        inter = 1 - pearson(y_s, y_t).mean()
        intra = 1 - pearson(y_s.T, y_t.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


class DISTLoss(Term):
    """``weight * dist_loss`` on the logits."""

    name = "dist"

    def __init__(self, weight: float, tap: str = LOGITS, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__(weight, tap)
        self.beta = check_positive(beta, "beta", strict=False)
        self.gamma = check_positive(gamma, "gamma", strict=False)
        self.temperature = check_positive(temperature, "temperature")

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None) -> Tensor:
        return dist_loss(feat_s, feat_t, self.beta, self.gamma, self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta:g}, gamma={self.gamma:g}, temperature={self.temperature:g}"
