"""Distillation losses (METHOD.md): pure functions of tensors plus thin weighted modules."""
from kdseg.losses.pairwise import PairwiseLoss, pairwise_kernel, pairwise_loss, pairwise_nodes
from kdseg.losses.pixelwise import PixelwiseLoss, attention_map, pixelwise_loss

__all__ = [
    "PairwiseLoss",
    "PixelwiseLoss",
    "attention_map",
    "pairwise_kernel",
    "pairwise_loss",
    "pairwise_nodes",
    "pixelwise_loss",
]
