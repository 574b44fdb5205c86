"""Attention transfer, AT (Zagoruyko & Komodakis, ICLR 2017), as in CIRKD's ``losses/at.py``.

The attention map of a feature map is the channel mean of its squared activations,
flattened and L2-normalised per image; the loss is the mean squared difference of the
student's and the teacher's maps. This is the pixel-wise loss (pi) with
``normalize="spatial"``, so it reuses :func:`~kdseg.losses.pixelwise.pixelwise_loss`.
CIRKD weighs it 10,000 on the last feature map before the classifier.
"""
from __future__ import annotations

from torch import Tensor

from kdseg.losses.base import Term
from kdseg.losses.pixelwise import pixelwise_loss


def at_loss(feat_s: Tensor, feat_t: Tensor) -> Tensor:
    """mean((normalize(mean_c s^2) - normalize(mean_c t^2))^2), maps flattened per image."""
    return pixelwise_loss(feat_s, feat_t, normalize="spatial", detach_teacher=False)


class ATLoss(Term):
    """``weight * at_loss`` (default tap: the decoder's output, the last feature before the classifier)."""

    name = "at"

    def __init__(self, weight: float, tap: str = "decoder.block2") -> None:
        super().__init__(weight, tap)

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None) -> Tensor:
        return at_loss(feat_s, feat_t)
