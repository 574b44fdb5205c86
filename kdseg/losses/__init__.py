"""Distillation losses: the term protocol (:mod:`kdseg.losses.base`) and one module per method,
each a pure function of tensors plus a thin :class:`~kdseg.losses.base.Term`."""
from kdseg.losses.afdcd import AfDCDLoss, mimic_loss, omni_contrastive_loss
from kdseg.losses.aicsd import AICSDLoss, ics_loss
from kdseg.losses.at import ATLoss, at_loss
from kdseg.losses.base import LOGITS, Progress, Term
from kdseg.losses.bpkd import BPKDLoss, bpkd_loss
from kdseg.losses.cirkd import CIRKDLoss, minibatch_pair_loss
from kdseg.losses.cwd import CWDLoss, cwd_loss
from kdseg.losses.dist import DISTLoss, dist_loss
from kdseg.losses.dkd import DKDLoss, dkd_loss
from kdseg.losses.fitnet import FitNetLoss, fitnet_loss
from kdseg.losses.ifvd import IFVDLoss, ifvd_loss
from kdseg.losses.kd import KDLoss, kd_loss
from kdseg.losses.pairwise import PairwiseLoss, pairwise_kernel, pairwise_loss, pairwise_nodes
from kdseg.losses.pixelwise import PixelwiseLoss, attention_map, pixelwise_loss

__all__ = [
    "LOGITS",
    "AICSDLoss",
    "AfDCDLoss",
    "ATLoss",
    "BPKDLoss",
    "CIRKDLoss",
    "CWDLoss",
    "DISTLoss",
    "DKDLoss",
    "FitNetLoss",
    "IFVDLoss",
    "KDLoss",
    "PairwiseLoss",
    "PixelwiseLoss",
    "Progress",
    "Term",
    "at_loss",
    "attention_map",
    "bpkd_loss",
    "cwd_loss",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "ics_loss",
    "ifvd_loss",
    "kd_loss",
    "mimic_loss",
    "minibatch_pair_loss",
    "omni_contrastive_loss",
    "pairwise_kernel",
    "pairwise_loss",
    "pairwise_nodes",
    "pixelwise_loss",
]
