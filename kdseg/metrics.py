"""Segmentation metrics from a confusion matrix accumulated over a whole split.

METHOD.md: mean IoU over the classes, from one confusion matrix accumulated over
the whole validation set (not a mean of per-image IoUs). Values are fractions
in [0, 1].
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdseg.data.classes import IGNORE_INDEX


class ConfusionMatrix:
    """Running ``num_classes x num_classes`` int64 confusion matrix; rows = ground truth, cols = prediction.

    ``mat`` lives on the device of the tensors given to ``update`` (it follows
    them there on the first call), so a DDP trainer can ``all_reduce(cm.mat)``
    before ``compute()``. Pixels whose target equals ``ignore_index`` are skipped.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
        strict: bool = True,
        eager_checks: bool | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.strict = strict
        self.eager_checks = eager_checks
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.invalid = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        self.mat.zero_()
        self.invalid.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of integer label maps (same shape, e.g. B x H x W).

        A target outside ``0..num_classes-1`` that is not ``ignore_index``, or a
        prediction outside that range, is never counted; with ``strict`` (the
        default) it is an error, because silently dropping labels hides data bugs.
        Where that error is raised depends on ``eager_checks``: ``True`` checks here
        and names the bad values, at the cost of one device-to-host sync per call;
        ``False`` counts the bad pixels on the device and ``compute()`` raises, so an
        update never waits for the device; ``None`` (the default) checks eagerly for
        CPU tensors (no sync to save) and deferred elsewhere. Counting is one
        scatter-add per call into ``K*K + 2`` bins (the matrix, ignored pixels, bad
        pixels): a bincount that, unlike ``torch.bincount`` on CUDA, does not read the
        input's min and max back to the host.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"confusion matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(
                f"confusion matrix: pred and target must be integer label maps, got {pred.dtype} and {target.dtype}"
            )
        k = self.num_classes
        if self.mat.device != target.device:
            self.mat, self.invalid = self.mat.to(target.device), self.invalid.to(target.device)
        t = target.reshape(-1).long()
        p = pred.reshape(-1).to(device=t.device, dtype=torch.long)
        valid_t = (t >= 0) & (t < k)
        valid_p = (p >= 0) & (p < k)
        bad = (~valid_t & (t != self.ignore_index)) | ~valid_p
        eager = self.eager_checks if self.eager_checks is not None else t.device.type == "cpu"
        if self.strict and eager and bool(torch.any(bad)):
            bad_t = torch.unique(t[~valid_t & (t != self.ignore_index)]).tolist()
            bad_p = torch.unique(p[~valid_p]).tolist()
            raise ValueError(
                f"confusion matrix: labels outside 0..{k - 1} (ignore_index={self.ignore_index}): "
                f"target values {bad_t}, prediction values {bad_p}"
            )
        index = torch.where(valid_t & valid_p, t * k + p, torch.where(bad, k * k + 1, k * k))
        counts = torch.zeros(k * k + 2, dtype=torch.int64, device=t.device)
        counts.scatter_add_(0, index, torch.ones_like(index))
        self.mat += counts[: k * k].view(k, k)
        self.invalid += counts[k * k + 1]

    def compute(self) -> dict[str, float | list[float]]:
        """``{"miou", "pixel_acc", "iou"}`` as fractions in [0, 1]; the one host sync of an evaluation.

        IoU_c = TP / (TP + FP + FN). A class absent from both ground truth and
        prediction has a zero denominator: its IoU is NaN and it is left out of
        the mean. With no counted pixel at all, every value is NaN.
        """
        if self.strict and int(self.invalid) > 0:
            raise ValueError(
                f"confusion matrix: {int(self.invalid)} pixels had labels outside 0..{self.num_classes - 1} "
                f"(ignore_index={self.ignore_index}) in target or prediction"
            )
        mat = self.mat.detach().to("cpu", torch.float64)
        tp = mat.diagonal()
        union = mat.sum(0) + mat.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        total = mat.sum()
        pixel_acc = (tp.sum() / total).item() if total > 0 else float("nan")
        return {"miou": iou.nanmean().item(), "pixel_acc": pixel_acc, "iou": iou.tolist()}
