"""Distiller: a frozen teacher, a student, feature taps and the weighted loss terms.

``L = L_ce + sum_k term_k(student input_k, teacher input_k, masks)`` where each term already
carries its weight (METHOD.md) and declares what it reads (:mod:`kdseg.losses.base`): the
output of a module path (captured by forward hooks) or the logits. Terms come from the
config's ``loss.terms`` (those with weight > 0); with none, no teacher is needed and none is run.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from enum import Enum

import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from kdseg.data.classes import IGNORE_INDEX
from kdseg.errors import ConfigError, one_line
from kdseg.losses.base import LOGITS, Term, labelled, void_safe
from kdseg.models import FeatureTaps, resolve_taps
from kdseg.utils import choice

NO_TERMS = "none"
"""The label of a run with cross-entropy only."""


class BnMode(str, Enum):
    """``teacher.bn_mode``: how the frozen teacher's BatchNorm layers normalise."""

    eval = "eval"
    """running statistics (kdseg's default)"""
    train = "train"
    """batch statistics, running statistics drift (the reference code)"""


def active_terms(weights: Mapping[str, float]) -> list[str]:
    """The names of the terms whose weight is > 0, in the given (config) order: the terms a run
    builds, its ``loss`` tag and its row in a sweep summary."""
    return [name for name, weight in weights.items() if weight > 0]


def build_terms(terms: DictConfig) -> dict[str, Term]:
    """The active terms of ``loss.terms`` (:func:`active_terms`), instantiated, in config order.

    A bad value in a term's node (a wrong type, an unknown argument, a target that is not a
    :class:`~kdseg.losses.base.Term`) is a :class:`ConfigError` naming ``loss.terms.<name>``.
    """
    built = {}
    for name in active_terms({name: node.weight for name, node in terms.items()}):
        node = terms[name]
        try:
            term = instantiate(node)
        except InstantiationException as err:
            raise ConfigError(f"config loss.terms.{name}: {one_line(err.__cause__ or err)}") from None
        if not isinstance(term, Term):
            raise ConfigError(
                f"config loss.terms.{name}._target_={node.get('_target_')!r}: expected a subclass of "
                f"kdseg.losses.base.Term, got {type(term).__name__}"
            )
        built[name] = term
    return built


def align_to(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """The student's map resized (bilinear, ``align_corners=False``) to the teacher's H x W, as METHOD.md
    says; returned as it is when the sizes already agree (every DeepLabV3+ pair)."""
    if feat_s.shape[-2:] == feat_t.shape[-2:]:
        return feat_s
    return F.interpolate(feat_s, size=feat_t.shape[-2:], mode="bilinear", align_corners=False)


def term_label(names: list[str] | tuple[str, ...] | Mapping) -> str:
    """``pi+pa`` for the terms ``pi`` and ``pa`` (in config order); ``none`` for cross-entropy only."""
    return "+".join(names) or NO_TERMS


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

    At construction one probe pass of both networks on an ``input_size`` image (eval mode, no
    gradients, no random draws) gives every term the shapes it reads, so terms with learned
    parts build them (:meth:`Term.setup`), and a term that cannot be computed at that size
    (a pooling kernel larger than the map, say) is a :class:`ConfigError` before training.
    In train mode each step first lets every term update its state (:meth:`Term.update_state`,
    no gradients); the probe does not, so it leaves the terms' state as ``setup`` built it.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: Mapping[str, Term] | None = None,
        ignore_index: int = IGNORE_INDEX,
        teacher_bn_mode: str = "eval",
        teacher_grad: bool = False,
        input_size: int | tuple[int, int] = 64,
    ) -> None:
        super().__init__()
        terms = terms or {}
        active = {name: terms[name] for name in active_terms({name: term.weight for name, term in terms.items()})}
        if active and teacher is None:
            raise ValueError(f"loss terms {sorted(active)} need a teacher, but none was given")
        self.student = student
        self.terms = nn.ModuleDict(active)
        self.ignore_index = ignore_index
        self.teacher_bn_mode = choice(BnMode, teacher_bn_mode, "teacher.bn_mode")
        self.teacher_grad = teacher_grad
        self.teacher = freeze(teacher) if active else None
        self.teacher_pass: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
        """Runs the teacher instead of :meth:`run_teacher`'s own call (a fused sweep: one pass per batch for every student)."""
        if self.teacher is not None and teacher_grad:
            self.teacher.requires_grad_(True)
        self.tap_keys = {name: resolve_taps(student, self.teacher, term.tap, LOGITS) for name, term in active.items()}
        self.student_taps = FeatureTaps(student, [s for s, _ in self.tap_keys.values() if s != LOGITS]) if active else None
        self.teacher_taps = FeatureTaps(self.teacher, [t for _, t in self.tap_keys.values() if t != LOGITS]) if active else None
        if active:
            self._setup_terms(input_size)

    def _setup_terms(self, input_size: int | tuple[int, int]) -> None:
        """The probe pass: each term's ``setup`` with the shapes it reads, then one evaluation of it."""
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        device = next(self.student.parameters()).device
        images = torch.zeros(1, 3, h, w, device=device)
        masks = torch.zeros(1, h, w, dtype=torch.long, device=device)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                logits_s, logits_t = self.student(images), self.teacher(images)
                for name, term in self.terms.items():
                    feat_s, feat_t = self._inputs(name, logits_s, logits_t)
                    (key_s, key_t), size = self.tap_keys[name], lambda t: "x".join(map(str, t.shape))
                    shapes = f"student {size(feat_s)} ({key_s}), teacher {size(feat_t)} ({key_t})"
                    try:
                        term.setup(tuple(feat_s.shape), tuple(feat_t.shape))
                        term.to(device)
                        term.eval()  # the probe leaves BatchNorm statistics of learned parts as built
                        term(feat_s, feat_t, masks)
                    except (ValueError, RuntimeError) as err:
                        raise ConfigError(
                            f"loss.terms.{name} cannot be computed for {h}x{w} inputs (dataset.crop_size): {one_line(err)} [{shapes}]"
                        ) from None
        finally:
            self.student.train(was_training)
            self.terms.train(self.training)
            self.student_taps.clear()
            self.teacher_taps.clear()

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(mode and self.teacher_bn_mode == BnMode.train)
        return self

    def run_teacher(self, images: torch.Tensor) -> torch.Tensor:
        """One teacher pass that fills ``teacher_taps``; returns its logits (inference mode unless ``teacher_grad``)."""
        if self.teacher_pass is not None:
            return self.teacher_pass(self.teacher, images)
        with nullcontext() if self.teacher_grad else torch.inference_mode():
            return self.teacher(images)

    def _inputs(self, name: str, logits_s: torch.Tensor, logits_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What term ``name`` reads from the student and the teacher, the student's resized to the teacher's H x W."""
        key_s, key_t = self.tap_keys[name]
        feat_s = logits_s if key_s == LOGITS else self.student_taps[key_s]
        feat_t = logits_t if key_t == LOGITS else self.teacher_taps[key_t]
        return align_to(feat_s, feat_t), feat_t

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        logits = self.student(images)
        ce = F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
        losses = {"ce": void_safe(ce, labelled(masks, self.ignore_index))}  # an all-void batch: 0, not NaN
        if self.teacher is not None:
            logits_t = self.run_teacher(images)
            for name, term in self.terms.items():
                feat_s, feat_t = self._inputs(name, logits, logits_t)
                if self.training:
                    with torch.no_grad():
                        term.update_state(feat_s, feat_t, masks)
                losses[name] = term(feat_s, feat_t, masks, detach_teacher=not self.teacher_grad)
            self.student_taps.clear()
            self.teacher_taps.clear()
        total = sum(losses.values())
        return total, {k: v.detach() for k, v in losses.items()}, logits
