"""Distiller: a frozen teacher, a student, feature taps and the weighted loss terms.

``L = L_ce + sum_k term_k(student_tap_k, teacher_tap_k)`` where each term already carries
its weight (METHOD.md). Terms with weight 0 are dropped; with none left, no teacher is
needed and none is run.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from kdseg.data.classes import IGNORE_INDEX
from kdseg.models import FeatureTaps


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher's weights and BN buffers stay as loaded."""
    model.eval()
    model.requires_grad_(False)
    return model


class Distiller(nn.Module):
    """Student + frozen teacher; ``forward`` returns the total loss, its parts and the student logits.

    The teacher runs once per batch under ``torch.inference_mode`` and in eval mode (BatchNorm
    on running statistics) even while the distiller is in train mode; its taps hold the features
    the loss terms read. Two switches reproduce the reference code instead:
    ``teacher_bn_mode='train'`` (batch statistics, running statistics drift) and
    ``teacher_grad=True`` (the teacher's autograd graph is kept and the loss is back-propagated
    through it and into its weights, which no optimiser steps: a full extra backward pass).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: Mapping[str, nn.Module] | None = None,
        ignore_index: int = IGNORE_INDEX,
        teacher_bn_mode: str = "eval",
        teacher_grad: bool = False,
    ) -> None:
        super().__init__()
        if teacher_bn_mode not in ("eval", "train"):
            raise ValueError(f"teacher.bn_mode must be 'eval' or 'train', got '{teacher_bn_mode}'")
        active = {name: term for name, term in (terms or {}).items() if term.weight > 0}
        if active and teacher is None:
            raise ValueError(f"loss terms {sorted(active)} need a teacher, but none was given")
        self.student = student
        self.terms = nn.ModuleDict(active)
        self.ignore_index = ignore_index
        self.teacher_bn_mode = teacher_bn_mode
        self.teacher_grad = teacher_grad
        self.teacher = freeze(teacher) if active else None
        if self.teacher is not None and teacher_grad:
            self.teacher.requires_grad_(True)
        taps = [term.tap for term in active.values()]
        self.student_taps = FeatureTaps(student, taps) if active else None
        self.teacher_taps = FeatureTaps(self.teacher, taps) if active else None

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(mode and self.teacher_bn_mode == "train")
        return self

    def run_teacher(self, images: torch.Tensor) -> None:
        """One teacher pass that fills ``teacher_taps`` (inference mode unless ``teacher_grad``)."""
        with nullcontext() if self.teacher_grad else torch.inference_mode():
            self.teacher(images)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        logits = self.student(images)
        losses = {"ce": F.cross_entropy(logits, masks, ignore_index=self.ignore_index)}
        if self.teacher is not None:
            self.run_teacher(images)
            for name, term in self.terms.items():
                if self.teacher_grad:
                    losses[name] = term(self.student_taps[term.tap], self.teacher_taps[term.tap], detach_teacher=False)
                else:
                    losses[name] = term(self.student_taps[term.tap], self.teacher_taps[term.tap])
            self.student_taps.clear()
            self.teacher_taps.clear()
        total = sum(losses.values())
        return total, {k: v.detach() for k, v in losses.items()}, logits
