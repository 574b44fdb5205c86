"""The loss-term protocol: what every distillation term declares and how the Distiller calls it.

A term is one ``nn.Module`` built from one node of ``loss.terms`` (``_target_`` plus its
arguments). It declares

- ``weight``: its factor in ``L = L_ce + sum_k weight_k * term_k``; 0 switches it off (no
  teacher is built when every term is off);
- ``tap``: what it reads from both networks, a module path whose output a forward hook
  captures (e.g. ``decoder.block2.1``), a role (``decoder``: the segmentation head's input;
  ``encoder``: the deepest encoder feature), ``"logits"`` for the networks' outputs, or a
  mapping ``{student: ..., teacher: ...}`` of one of those per side (resolved per pair by
  :func:`kdseg.models.resolve_taps`). Where the two maps differ in H x W, the Distiller resizes the
  student's to the teacher's first; a channel mismatch is the term's to handle.

The Distiller calls ``term(student_input, teacher_input, masks)`` with the batch's labels
(B x H x W, 255 = void), for terms that leave out void pixels or build class prototypes;
it returns ``weight * term.loss(...)``. A term with learned parts (an adapter) builds them in
:meth:`Term.setup`, which gets the shapes both networks give at the tap before training;
their parameters are trained with the student and saved with its checkpoint.

Adding a method is one module (a pure function of tensors plus a thin :class:`Term`) and one
yaml in ``conf/loss/`` whose ``terms.<name>`` node targets it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn import functional as F

from kdseg.data.classes import IGNORE_INDEX
from kdseg.errors import ConfigError

SIDES = ("student", "teacher")
"""The keys of a per-side ``tap`` mapping."""
LOGITS = "logits"
"""The ``tap`` value that makes a term read the networks' outputs (B x classes x H x W)."""


def check_positive(value: float, what: str, minimum: float = 0.0, strict: bool = True) -> float:
    """``value`` as a float, or a :class:`ConfigError` saying what was expected."""
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    ok = number > minimum if strict else number >= minimum
    if not ok or not math.isfinite(number):
        raise ConfigError(f"{what}={value!r}: expected a number {'>' if strict else '>='} {minimum:g}")
    return number


def check_tap(tap: str | Mapping[str, str]) -> str | dict[str, str]:
    """``tap`` as a string or a plain ``{student, teacher}`` dict, or a :class:`ConfigError` saying what was expected."""
    if isinstance(tap, Mapping) and set(tap) == set(SIDES) and all(isinstance(v, str) and v for v in tap.values()):
        return {side: str(tap[side]) for side in SIDES}
    if not isinstance(tap, str) or not tap:
        raise ConfigError(f"tap={tap!r}: expected a module path, a role (decoder, encoder), '{LOGITS}', "
                          "or {student: ..., teacher: ...} of those")
    return tap


class Term(nn.Module):
    """Base class of the distillation terms (see the module docstring for the protocol)."""

    def __init__(self, weight: float, tap: str | Mapping[str, str]) -> None:
        super().__init__()
        self.weight = check_positive(weight, "weight", strict=False)
        self.tap = check_tap(tap)

    @property
    def reads_logits(self) -> bool:
        return self.tap == LOGITS

    def setup(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        """Build learned parts for these input shapes (B x C x H x W); nothing by default."""

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        """The unweighted loss; ``feat_t`` is already detached unless the teacher takes gradients."""
        raise NotImplementedError

    def forward(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None, detach_teacher: bool = True) -> Tensor:
        return self.weight * self.loss(feat_s, feat_t.detach() if detach_teacher else feat_t, masks)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, tap={self.tap!r}"


def valid_pixels(masks: Tensor, size: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> Tensor:
    """B x H x W boolean map of labelled pixels at ``size`` (labels nearest-resized if needed)."""
    return labels_at(masks, size) != ignore_index


def labels_at(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels (B x H x W) nearest-resized to ``size`` (a feature map's H x W)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
