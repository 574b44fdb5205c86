"""Af-DCD, augmentation-free dense contrastive distillation (Fan et al., NeurIPS 2023), as in the
authors' code (OSVAI/Af-DCD ``losses/ocmgd.py``, ``OmniContrastiveFeatureLoss``).

The student's map is aligned to the teacher's channels (a 1x1 conv with bias, when the counts
differ), masked (each pixel zeroed with probability ``mask_ratio`` = 0.75) and passed through a
learned projector (3x3 conv, ReLU, 3x3 conv, with biases). Two parts, weighted as the authors'
VOC script (``train_scripts/voc/deeplabv3_res18.sh``: 1e-6 and 0.005):

- masked feature mimicking: sum over elements of (projected - teacher)^2, divided by the batch;
- omni-contrastive: both maps are max-pooled 4 x 4, cut into 4 x 4 patches and their channels
  into M = 16 groups; in each patch every (position, group) token of the student is a query
  whose positive is the teacher's token at the same position and group and whose negatives are
  the teacher's tokens of every other group (any position of the patch); similarity = minus the
  L1 distance, divided by tau = 0.07; cross-entropy of the positive, summed over queries and
  divided by the pooled H * W and by the batch (spatial and channel contrast at once).

It reads no labels. Where this differs from the code: the code calls its align conv even when
the channel counts match (it then does not exist); here the student's map is used as it is.
The random mask is drawn from a generator seeded by (``seed``, a step counter kept as the
term's state, :mod:`kdseg.losses.base`) instead of torch's global one, so the run's other
random streams are untouched and a resumed run draws the same masks (one mask stream for all
DDP ranks, which see different images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdseg.errors import ConfigError
from kdseg.losses.base import Term, check_positive, step_generator


def _float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mimic_loss(pred: Tensor, target: Tensor) -> Tensor:
    """sum((pred - target)^2) / B: the code's ``MSELoss(reduction='sum') / BS``."""
    if pred.shape != target.shape:
        raise ValueError(f"Af-DCD loss: the projected student map {tuple(pred.shape)} and the teacher map {tuple(target.shape)} differ in shape")
    return (pred - target).pow(2).sum() / pred.shape[0]


def patch_tokens(x: Tensor, patch: int, groups: int) -> Tensor:
    """(B * patches) x (patch^2 * groups) x (C / groups) tokens; token index = position * groups + group."""
    b, c, h, w = x.shape
    if h % patch or w % patch or c % groups:
        raise ValueError(
            f"Af-DCD loss: a {c} x {h} x {w} map (after pooling) cannot be cut into {patch} x {patch} patches "
            f"and {groups} channel groups; use a larger crop, a smaller pool_size or patch_size, or a divisor of {c} for groups"
        )
    x = x.reshape(b, groups, c // groups, h // patch, patch, w // patch, patch)
    x = x.permute(0, 3, 5, 4, 6, 1, 2)  # B, h', w', patch row, patch col, group, channel in group
    return x.reshape(b * (h // patch) * (w // patch), patch * patch * groups, c // groups)


def omni_contrastive_loss(pred: Tensor, target: Tensor, temperature: float = 0.07, groups: int = 16,
                          pool_size: int = 4, patch_size: int = 4) -> Tensor:
    """Sum over (position, group) queries of -log softmax of the positive among it and the other groups'
    teacher tokens, similarity -L1 / tau, divided by the pooled H * W and by the batch."""
    if pred.shape != target.shape:
        raise ValueError(f"Af-DCD loss: the projected student map {tuple(pred.shape)} and the teacher map {tuple(target.shape)} differ in shape")
    if pool_size:
        if min(pred.shape[-2:]) < pool_size:
            raise ValueError(f"Af-DCD loss: a {tuple(pred.shape[-2:])} map is smaller than the pooling window pool_size={pool_size}")
        pred, target = F.max_pool2d(pred, pool_size), F.max_pool2d(target, pool_size)
    b, _, h, w = pred.shape
    queries, keys = patch_tokens(pred, patch_size, groups), patch_tokens(target, patch_size, groups)
    logits = -torch.cdist(queries, keys, p=1) / temperature  # patches x K x K
    group = torch.arange(queries.shape[1], device=pred.device) % groups
    candidates = (group[:, None] != group[None, :]) | torch.eye(queries.shape[1], dtype=torch.bool, device=pred.device)
    positives = logits.diagonal(dim1=1, dim2=2)
    log_z = torch.logsumexp(logits.masked_fill(~candidates, float("-inf")), dim=2)
    return (log_z - positives).sum() / (h * w) / b


def projector(channels: int) -> nn.Module:
    """The code's default projector: 3x3 conv, ReLU, 3x3 conv (with biases), channels kept."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
    )


class AfDCDLoss(Term):
    """``weight * (fd_weight * mimic + ctr_weight * omni-contrastive)`` of the masked, projected student map."""

    name = "afdcd"

    def __init__(
        self,
        weight: float,
        tap: str = "decoder.block2",
        fd_weight: float = 1e-6,
        ctr_weight: float = 0.005,
        mask_ratio: float = 0.75,
        temperature: float = 0.07,
        groups: int = 16,
        pool_size: int = 4,
        patch_size: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(weight, tap)
        self.fd_weight = check_positive(fd_weight, "fd_weight", strict=False)
        self.ctr_weight = check_positive(ctr_weight, "ctr_weight", strict=False)
        self.mask_ratio = check_positive(mask_ratio, "mask_ratio", strict=False)
        if self.mask_ratio >= 1:
            raise ConfigError(f"mask_ratio={mask_ratio!r}: expected a number in [0, 1)")
        self.temperature = check_positive(temperature, "temperature")
        for key, value, least in (("groups", groups, 1), ("pool_size", pool_size, 0), ("patch_size", patch_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"Af-DCD loss: {key}={value!r}: expected an integer >= {least}")
        self.groups, self.pool_size, self.patch_size = groups, pool_size, patch_size
        self.seed = int(seed)
        self.align: nn.Module | None = None
        self.projector: nn.Module | None = None

    def setup(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        """Align conv and projector, drawn from ``seed`` (torch's global generator is left as it was); step 0."""
        s, t = student_shape[1], teacher_shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.align = nn.Identity() if s == t else nn.Conv2d(s, t, kernel_size=1)
            self.projector = projector(t)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def update_state(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> None:
        """One more step: the next batch draws a new mask."""
        self.step += 1

    def keep_mask(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """B x 1 x H x W: 0 where the pixel is masked (probability ``mask_ratio``), else 1 (the code's rule)."""
        b, _, h, w = shape
        draws = torch.rand(b, 1, h, w, generator=step_generator(self.seed, int(self.step)))
        return (draws <= 1 - self.mask_ratio).to(device)

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None = None) -> Tensor:
        if self.projector is None:
            raise RuntimeError("Af-DCD loss: setup(student_shape, teacher_shape) must build the projector first")
        aligned = self.align(feat_s)
        projected = self.projector(aligned * self.keep_mask(tuple(aligned.shape), aligned.device).to(aligned.dtype))
        with torch.autocast(device_type=feat_s.device.type, enabled=False):
            pred, target = _float32(projected), _float32(feat_t)
            fd = mimic_loss(pred, target)
            ctr = omni_contrastive_loss(pred, target, self.temperature, self.groups, self.pool_size, self.patch_size)
        return self.fd_weight * fd + self.ctr_weight * ctr

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, fd_weight={self.fd_weight:g}, ctr_weight={self.ctr_weight:g}, mask_ratio={self.mask_ratio:g}, "
            f"temperature={self.temperature:g}, groups={self.groups}, pool_size={self.pool_size}, patch_size={self.patch_size}"
        )
