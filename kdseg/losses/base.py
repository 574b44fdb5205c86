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

A batch may hold no labelled pixel at all (a crop of ADE20K or Cityscapes that is all void).
A term that averages over labelled pixels must then give 0 with zero gradient, not NaN:
:func:`masked_mean` is such a mean, and :func:`void_safe` replaces a loss already computed
by 0 where nothing is labelled (both without a device sync; see their caveats).

A term whose loss depends on how far training has come (a weight schedule) reads
``self.progress`` (:class:`Progress`): the Trainer calls :meth:`Term.set_progress` before every
training step with the epoch and iteration it restores on resume, so a resumed run sees the
same progress as an uninterrupted one and nothing extra is saved.

A term with **state** across iterations (CIRKD's memory queues, a step counter) keeps it in
buffers registered in :meth:`Term.setup` and changes it only in :meth:`Term.update_state`,
which the Distiller calls once per training step, under ``torch.no_grad``, before the term's
loss; the probe pass and evaluation never call it. Buffers go where the learned parts go:
saved in the checkpoint's ``terms`` and restored on resume, broadcast from rank 0 by DDP at
each step, never part of the student or its export. A stateful term draws its random numbers
from :func:`step_generator` (seeded by its ``seed`` and a step counter it keeps as a buffer),
not from torch's global generator, so it is the same on every rank, resumes bit for bit and
leaves the run's other random streams alone.

Adding a method is one module (a pure function of tensors plus a thin :class:`Term`) and one
yaml in ``conf/loss/`` whose ``terms.<name>`` node targets it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
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


@dataclass(frozen=True)
class Progress:
    """Where training stands at a step: ``epoch`` of ``epochs`` (1-based), ``iteration`` of ``max_iters`` (0-based)."""

    epoch: int = 1
    epochs: int = 1
    iteration: int = 0
    max_iters: int = 1


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
        self.progress = Progress()

    @property
    def reads_logits(self) -> bool:
        return self.tap == LOGITS

    def setup(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        """Build learned parts for these input shapes (B x C x H x W); nothing by default."""

    def set_progress(self, progress: Progress) -> None:
        """Called by the Trainer before every training step; terms with a schedule read ``self.progress``."""
        self.progress = progress

    def update_state(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> None:
        """Advance the term's state with this training batch (called before :meth:`loss`); nothing by default."""

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        """The unweighted loss; ``feat_t`` is already detached unless the teacher takes gradients."""
        raise NotImplementedError

    def forward(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None, detach_teacher: bool = True) -> Tensor:
        return self.weight * self.loss(feat_s, feat_t.detach() if detach_teacher else feat_t, masks)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, tap={self.tap!r}"


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for draw ``stream`` (0..7) of step ``step`` of a term seeded by ``seed``."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 8 + stream) % 2**63)


def valid_pixels(masks: Tensor, size: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> Tensor:
    """B x H x W boolean map of labelled pixels at ``size`` (labels nearest-resized if needed)."""
    return labels_at(masks, size) != ignore_index


def labels_at(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels (B x H x W) nearest-resized to ``size`` (a feature map's H x W)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()


def labelled(masks: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """A 0-d boolean tensor: whether the batch has at least one labelled (non-void) pixel (no device sync)."""
    return (masks != ignore_index).any()


def void_safe(loss: Tensor, has_labels: Tensor) -> Tensor:
    """``loss`` where ``has_labels`` (:func:`labelled`), else 0 with zero gradient.

    The value and gradient of ``loss`` pass through unchanged when there are labels (bit for bit).
    Without labels, ``loss`` itself may be NaN (a mean over nothing): it is replaced by 0 and
    gets a zero upstream gradient. Only for losses whose backward stays finite with a zero
    upstream gradient (cross-entropy with ``ignore_index``, a mean over a boolean selection);
    ``0 / 0`` in the graph would still give NaN gradients: use :func:`masked_mean` for those.
    """
    return torch.where(has_labels, loss, 0.0)


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the entries where ``valid`` (same shape); 0 with zero gradient
    when no entry is valid. Non-finite values at invalid entries do not leak into the result
    or the gradient. No device sync (no boolean indexing)."""
    total = torch.where(valid, values, 0.0).sum()
    return total / valid.sum().clamp_min(1)
