"""Intra-class feature variation distillation, IFVD (Wang et al., ECCV 2020), as in CIRKD.

Labels are nearest-resized to the feature map. Per image, each class present has a
prototype, the mean feature of its pixels; every labelled pixel gets the cosine
similarity between its feature and its class prototype (a pixel labelled 255 is compared
with itself, similarity 1, as in the reference). The loss is the mean squared difference of
the student's and the teacher's similarity maps over all pixels; a batch without a labelled
pixel gives exactly 0 with zero gradient (void pixels alone would leave rounding noise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.data.classes import IGNORE_INDEX
from kdseg.errors import ConfigError
from kdseg.losses.base import Term, labelled, labels_at, void_safe

PROTOTYPE_EPS = 1e-6


def class_similarity(feat: Tensor, labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """B x H x W cosine similarity of each pixel's feature to its class prototype (labels at the map's size)."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, num_classes), num_classes + 1)[..., :num_classes]
    onehot = onehot.movedim(-1, 1).to(feat.dtype)  # B x K x H x W
    sums = torch.einsum("bkhw,bchw->bkc", onehot, feat)
    prototypes = sums / (onehot.sum((2, 3)).unsqueeze(-1) + PROTOTYPE_EPS)
    centers = torch.einsum("bkhw,bkc->bchw", onehot, prototypes)
    centers = torch.where(valid.unsqueeze(1), centers, feat)
    return F.cosine_similarity(feat, centers, dim=1)


def ifvd_loss(feat_s: Tensor, feat_t: Tensor, labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """mean((sim_s - sim_t)^2) of the prototype-similarity maps, in float32; labels are resized to the maps.
    0 (zero gradient) when no pixel is labelled."""
    if feat_s.dim() != 4 or feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
        raise ValueError(
            "IFVD loss: student and teacher maps must be B x C x H x W with the same B, H and W; "
            f"got student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)}"
        )
    labels = labels_at(labels, feat_s.shape[-2:])
    dtype = torch.promote_types(feat_s.dtype, torch.float32)
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        sim_s = class_similarity(feat_s.to(dtype), labels, num_classes, ignore_index)
        sim_t = class_similarity(feat_t.to(dtype), labels, num_classes, ignore_index)
        return void_safe((sim_s - sim_t).pow(2).mean(), labelled(labels, ignore_index))


class IFVDLoss(Term):
    """``weight * ifvd_loss`` (default tap: the decoder's output, the last feature before the classifier)."""

    name = "ifvd"

    def __init__(self, weight: float, num_classes: int, tap: str = "decoder.block2", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(weight, tap)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes={num_classes!r}: expected an integer >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        if masks is None:
            raise ValueError("IFVD loss needs the batch's labels")
        return ifvd_loss(feat_s, feat_t, masks, self.num_classes, self.ignore_index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_classes={self.num_classes}"
