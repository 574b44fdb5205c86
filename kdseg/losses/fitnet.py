"""FitNets (Romero et al., ICLR 2015): the student's features regress the teacher's.

The loss is the mean squared error between the teacher's feature map and the student's,
the latter passed through a learned adapter (1x1 conv + BatchNorm) when the channel counts
differ. The adapter is built in :meth:`FitNetLoss.setup` from the shapes both networks give
at the tap; its parameters are trained with the student (at the head's learning rate) and
saved in the student's checkpoint under ``terms``, but are not part of the student itself.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdseg.losses.base import Term


def fitnet_loss(feat_s: Tensor, feat_t: Tensor) -> Tensor:
    """mean((s - t)^2) over every element, in float32; the maps must have one shape."""
    if feat_s.shape != feat_t.shape:
        raise ValueError(
            f"FitNet loss: the (adapted) student map {tuple(feat_s.shape)} and the teacher map "
            f"{tuple(feat_t.shape)} differ in shape"
        )
    dtype = torch.promote_types(feat_s.dtype, torch.float32)
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        return (feat_s.to(dtype) - feat_t.to(dtype)).pow(2).mean()


def adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """1x1 conv + BN from the student's channels to the teacher's; identity when they match."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False), nn.BatchNorm2d(teacher_channels)
    )


class FitNetLoss(Term):
    """``weight * fitnet_loss(adapter(student map), teacher map)``."""

    name = "fitnet"

    def __init__(self, weight: float, tap: str = "decoder.block2") -> None:
        super().__init__(weight, tap)
        self.adapter: nn.Module | None = None

    def setup(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        self.adapter = adapter(student_shape[1], teacher_shape[1])

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("FitNet loss: setup(student_shape, teacher_shape) must build the adapter first")
        return fitnet_loss(self.adapter(feat_s), feat_t)
