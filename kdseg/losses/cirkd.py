"""CIRKD, cross-image relational KD (Yang et al., CVPR 2022), as in the authors' code.

Three parts, summed with CIRKD's lambdas (``train_cirkd.py`` defaults: 1, 0.1, 0.1):

- mini-batch pixel-to-pixel (``losses/cirkd_mini_batch.py``): for every ordered pair of
  images (i, j) of the batch, the similarity matrix ``S_ij = f_i^T f_j`` of their
  L2-normalised pixel embeddings (each row one pixel of image i against every pixel of image
  j); loss = mean over the B^2 pairs of KL(softmax(T_ij / tau) || softmax(S_ij / tau)) per row,
  averaged over the rows (tau = 0.1, no tau^2 factor; maps of at least 256 x 256 are first
  average-pooled 4 x 4). It reads no labels.
- memory pixel-to-pixel and pixel-to-region (``losses/cirkd_memory.py``): every labelled
  pixel of the batch (labels nearest-resized to the map) is an anchor; its student embedding
  (a learned head: 1x1 conv, BN, ReLU, 1x1 conv to the teacher's channels, then L2-normalised)
  and its teacher embedding (L2-normalised) are compared with a contrast set drawn from two
  queues of the teacher's embeddings per class: pixels (20000 per class, 4096 // classes + 1
  drawn per class) and regions (the mean embedding of a class in an image, 2000 per class,
  1024 // classes + 1 drawn per class); loss = KL(softmax(t . X / tau) || softmax(s . X / tau))
  per anchor, averaged over the anchors (times kd_tau^2 = 1). No labelled pixel: both are 0.

The queues are the term's **state** (:mod:`kdseg.losses.base`): registered buffers built in
:meth:`CIRKDLoss.setup` (random unit vectors, as the authors start them), filled in
:meth:`CIRKDLoss.update_state` with the batch's teacher embeddings gathered from every DDP rank
(as the authors' ``concat_all_gather``) before the loss, so the batch's own regions are in its
contrast set, as in the authors' code. Each image pushes, per class present, its region mean
(ring buffer) and up to 16 pixel embeddings (a queue that restarts at 0 when full).

Where the paper and the code differ, this follows the code:

- the pixel queue's entries for class c are the embeddings at ``perm[:K]`` of the image's
  *first* n positions in raster order (n = the class's pixel count), not of the class's own
  pixels: the authors' ``this_feat[:, perm[:K]]`` indexes the flattened map, not ``idxs``;
- one random subset of queue slots is drawn per step and used for every class.

And where the code fails: with no labelled pixel its ``0. * (s_feats**2).mean()`` over an empty
selection is NaN; here the memory parts are 0 with a zero gradient.

Random draws (the pixel subsets, the contrast subsets) come from a generator seeded by
(``seed``, the term's step counter), not from torch's global one: they are the same on every
rank, restored with the checkpoint, and leave the data order and augmentations of the run
untouched. The head's BatchNorm is per process (CIRKD's is a SyncBatchNorm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdseg import dist
from kdseg.data.classes import IGNORE_INDEX
from kdseg.errors import ConfigError
from kdseg.losses.base import Term, check_positive, labels_at, step_generator

POOL_FROM = 256
"""Mini-batch part: maps of at least this height and width are average-pooled 4 x 4 first."""


def _float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def minibatch_pair_loss(feat_s: Tensor, feat_t: Tensor, temperature: float = 0.1) -> Tensor:
    """Mean over the B^2 image pairs (i, j) of the row-averaged KL(softmax(T_ij/tau) || softmax(S_ij/tau)),
    ``S_ij = s_i^T s_j`` of L2-normalised pixel embeddings (CIRKD's ``CriterionMiniBatchCrossImagePair``)."""
    if feat_s.dim() != 4 or feat_t.dim() != 4 or feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
        raise ValueError(
            "CIRKD loss: student and teacher maps must be B x C x H x W of one batch and size; "
            f"got student {tuple(feat_s.shape)} and teacher {tuple(feat_t.shape)}"
        )
    b, _, h, w = feat_s.shape
    with torch.autocast(device_type=feat_s.device.type, enabled=False):
        s, t = _float32(feat_s), _float32(feat_t)
        if h >= POOL_FROM and w >= POOL_FROM:
            s = F.avg_pool2d(s, 4, 4, ceil_mode=True)
            t = F.avg_pool2d(t, 4, 4, ceil_mode=True)
        s = F.normalize(s, dim=1).flatten(2).transpose(1, 2)  # B x N x C
        t = F.normalize(t, dim=1).flatten(2).transpose(1, 2)
        total = s.new_zeros(())
        for i in range(b):  # anchor image i against every image j at once: B x N x N
            log_p_s = F.log_softmax(s[i] @ s.transpose(1, 2) / temperature, dim=2)
            log_p_t = F.log_softmax(t[i] @ t.transpose(1, 2) / temperature, dim=2)
            total = total + F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / s.shape[1]
    return total / (b * b)


def contrast_kd(anchors_s: Tensor, anchors_t: Tensor, bank: Tensor, temperature: float = 0.1, kd_temperature: float = 1.0) -> Tensor:
    """kd_tau^2 * mean over anchors of KL(softmax(t X^T / tau / kd_tau) || softmax(s X^T / tau / kd_tau)); 0 for no anchor."""
    logits_s = anchors_s @ bank.T / temperature
    logits_t = anchors_t @ bank.T / temperature
    log_p_s = F.log_softmax(logits_s / kd_temperature, dim=1)
    log_p_t = F.log_softmax(logits_t / kd_temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl / max(anchors_s.shape[0], 1) * kd_temperature**2


@torch.no_grad()
def enqueue(
    pixel_queue: Tensor,
    pixel_ptr: Tensor,
    region_queue: Tensor,
    region_ptr: Tensor,
    keys: Tensor,
    labels: Tensor,
    pixels_per_class: int,
    generator: torch.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Push the teacher embeddings ``keys`` (B x D x H x W, unit length) of each labelled class of
    each image into the queues (classes x slots x D) in place, as CIRKD's ``_dequeue_and_enqueue``."""
    pixel_slots, region_slots = pixel_queue.shape[1], region_queue.shape[1]
    for feat, label in zip(keys.flatten(2), labels.flatten(1)):  # D x HW, HW
        for lb in [int(c) for c in torch.unique(label) if int(c) != ignore_index]:
            where = (label == lb).nonzero()[:, 0]
            ptr = int(region_ptr[lb])
            region_queue[lb, ptr] = F.normalize(feat[:, where].mean(1), dim=0)
            region_ptr[lb] = (ptr + 1) % region_slots
            n = where.numel()
            k = min(n, pixels_per_class)
            picked = feat[:, torch.randperm(n, generator=generator)[:k].to(feat.device)].T  # the code's indexing (module docstring)
            ptr = int(pixel_ptr[lb])
            if ptr + k >= pixel_slots:
                pixel_queue[lb, -k:] = F.normalize(picked, dim=1)
                pixel_ptr[lb] = 0
            else:
                pixel_queue[lb, ptr:ptr + k] = F.normalize(picked, dim=1)
                pixel_ptr[lb] = (ptr + k) % pixel_slots


def projection_head(student_channels: int, teacher_channels: int) -> nn.Module:
    """CIRKD's ``project_head``: 1x1 conv, BN, ReLU, 1x1 conv (no biases), student -> teacher channels."""
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
        nn.BatchNorm2d(teacher_channels),
        nn.ReLU(),
        nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
    )


class CIRKDLoss(Term):
    """``weight * (minibatch_weight * p2p + pixel_weight * memory p2p + region_weight * memory p2r)``."""

    name = "cirkd"

    def __init__(
        self,
        weight: float,
        tap: str = "decoder.aspp",
        num_classes: int | None = None,
        minibatch_weight: float = 1.0,
        pixel_weight: float = 0.1,
        region_weight: float = 0.1,
        temperature: float = 0.1,
        kd_temperature: float = 1.0,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        pixels_per_update: int = 16,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(weight, tap)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"CIRKD loss: num_classes={num_classes!r}: expected the dataset's class count (an integer >= 1)")
        self.num_classes = num_classes
        self.minibatch_weight = check_positive(minibatch_weight, "minibatch_weight", strict=False)
        self.pixel_weight = check_positive(pixel_weight, "pixel_weight", strict=False)
        self.region_weight = check_positive(region_weight, "region_weight", strict=False)
        self.temperature = check_positive(temperature, "temperature")
        self.kd_temperature = check_positive(kd_temperature, "kd_temperature")
        sizes = {"pixel_memory_size": pixel_memory_size, "region_memory_size": region_memory_size,
                 "pixel_contrast_size": pixel_contrast_size, "region_contrast_size": region_contrast_size,
                 "pixels_per_update": pixels_per_update}
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"CIRKD loss: {key}={value!r}: expected an integer >= 1")
        if pixels_per_update > pixel_memory_size:
            raise ConfigError(f"CIRKD loss: pixels_per_update={pixels_per_update} must be <= pixel_memory_size={pixel_memory_size}")
        self.pixel_memory_size, self.region_memory_size = pixel_memory_size, region_memory_size
        self.pixels_per_update = pixels_per_update
        # contrast entries drawn per class, as train_cirkd.py divides its totals
        self.pixel_per_class = pixel_contrast_size // num_classes + 1
        self.region_per_class = region_contrast_size // num_classes + 1
        self.seed = int(seed)
        self.ignore_index = ignore_index
        self.project: nn.Module | None = None

    def setup(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        """The projection head and the queues (random unit vectors), both drawn from ``seed`` (torch's
        global generator is left as it was); pointers and step at 0."""
        channels = teacher_shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.project = projection_head(student_shape[1], channels)
        init = torch.Generator().manual_seed(self.seed)
        pixels = torch.randn(self.num_classes, self.pixel_memory_size, channels, generator=init)
        regions = torch.randn(self.num_classes, self.region_memory_size, channels, generator=init)
        self.register_buffer("pixel_queue", F.normalize(pixels, dim=2))
        self.register_buffer("pixel_ptr", torch.zeros(self.num_classes, dtype=torch.long))
        self.register_buffer("region_queue", F.normalize(regions, dim=2))
        self.register_buffer("region_ptr", torch.zeros(self.num_classes, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _check_setup(self) -> None:
        if self.project is None:
            raise RuntimeError("CIRKD loss: setup(student_shape, teacher_shape) must build the head and queues first")

    def update_state(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> None:
        """Push this batch's teacher embeddings (every rank's) into the queues; advance the step."""
        self._check_setup()
        if masks is None:
            raise ValueError("CIRKD loss: the memory queues need the batch's labels")
        keys = F.normalize(_float32(feat_t.detach()), dim=1).to(self.pixel_queue.dtype)
        labels = labels_at(masks, feat_t.shape[-2:])
        enqueue(
            self.pixel_queue, self.pixel_ptr, self.region_queue, self.region_ptr,
            dist.all_gather_cat(keys), dist.all_gather_cat(labels), self.pixels_per_update,
            step_generator(self.seed, int(self.step), stream=0), self.ignore_index,
        )
        self.step += 1

    def loss(self, feat_s: Tensor, feat_t: Tensor, masks: Tensor | None) -> Tensor:
        self._check_setup()
        if masks is None:
            raise ValueError("CIRKD loss: the memory contrast needs the batch's labels")
        minibatch = minibatch_pair_loss(feat_s, feat_t, self.temperature)
        projected = self.project(feat_s)
        with torch.autocast(device_type=feat_s.device.type, enabled=False):
            emb_s = F.normalize(_float32(projected), dim=1)
            emb_t = F.normalize(_float32(feat_t), dim=1)
            valid = labels_at(masks, feat_s.shape[-2:]) != self.ignore_index
            anchors_s = emb_s.permute(0, 2, 3, 1)[valid]
            anchors_t = emb_t.permute(0, 2, 3, 1)[valid]
            draws = step_generator(self.seed, int(self.step), stream=1)
            pixel_index = torch.randperm(self.pixel_memory_size, generator=draws)[: self.pixel_per_class]
            region_index = torch.randperm(self.region_memory_size, generator=draws)[: self.region_per_class]
            pixel_bank = self.pixel_queue[:, pixel_index.to(self.pixel_queue.device)].flatten(0, 1).to(emb_s.dtype)
            region_bank = self.region_queue[:, region_index.to(self.region_queue.device)].flatten(0, 1).to(emb_s.dtype)
            pixel = contrast_kd(anchors_s, anchors_t, pixel_bank, self.temperature, self.kd_temperature)
            region = contrast_kd(anchors_s, anchors_t, region_bank, self.temperature, self.kd_temperature)
            memory = self.pixel_weight * pixel + self.region_weight * region  # 0 with no labelled pixel
        return self.minibatch_weight * minibatch + memory

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, classes={self.num_classes}, memory=({self.pixel_memory_size}, {self.region_memory_size}), "
            f"contrast per class=({self.pixel_per_class}, {self.region_per_class}), temperature={self.temperature:g}"
        )
