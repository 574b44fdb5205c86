"""Datasets and loaders from the ``dataset`` and ``trainer`` config groups."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from kdseg import dist
from kdseg.data.classes import IGNORE_INDEX
from kdseg.data.transforms import train_transforms, val_transforms
from kdseg.data.voc import VOCSegmentation


def dataset_root(cfg: DictConfig) -> Path:
    """The dataset folder; the built-in set is generated there on first use."""
    if cfg.name == "synthetic":
        from kdseg.data.synthetic import ensure_synthetic

        return ensure_synthetic(cfg.root, cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed)
    return Path(cfg.root)


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """Train and val datasets of the configured split lists, with the METHOD.md transforms."""
    root = dataset_root(cfg)
    train = VOCSegmentation(
        root,
        cfg.train_list,
        image_dir=cfg.image_dir,
        mask_dir=cfg.mask_dir,
        transforms=train_transforms(cfg.base_size, cfg.crop_size, tuple(cfg.scale_range), cfg.blur_prob),
    )
    val = VOCSegmentation(
        root,
        cfg.val_list,
        image_dir=cfg.image_dir,
        mask_dir=cfg.val_mask_dir,
        transforms=val_transforms(cfg.eval_mode, cfg.base_size, cfg.crop_size),
    )
    return train, val


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]], stride: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images of any size: pad bottom/right to a common multiple of ``stride``.

    Images are padded with 0 (the mean colour after normalisation) and masks with 255,
    so padded pixels never count in the loss or the metrics.
    """
    height = max(img.shape[-2] for img, _ in batch)
    width = max(img.shape[-1] for img, _ in batch)
    height, width = -(-height // stride) * stride, -(-width // stride) * stride
    images, masks = [], []
    for img, mask in batch:
        pad = (0, width - img.shape[-1], 0, height - img.shape[-2])
        images.append(F.pad(img.as_subclass(torch.Tensor), pad, value=0.0))
        masks.append(F.pad(mask.as_subclass(torch.Tensor), pad, value=IGNORE_INDEX))
    return torch.stack(images), torch.stack(masks).long()


def build_loaders(
    train_set: Dataset, val_set: Dataset, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Seeded, shuffled train loader (drops the last partial batch) and an ordered val loader.

    ``batch_size`` is per process. Under DDP each rank loads its part of one seeded
    permutation of the train split (``kdseg.dist.train_sampler``; the trainer reshuffles
    it every epoch) and a disjoint shard of the val split; with one process the parts are
    the whole splits.
    """
    world = dist.world_size()
    if len(train_set) // world < batch_size:
        where = f" split over {world} processes" if world > 1 else ""
        raise ValueError(
            f"trainer.batch_size={batch_size} is larger than the train split ({len(train_set)} images{where})"
        )
    generator = torch.Generator().manual_seed(seed + dist.rank())  # worker seeds differ by rank
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0, collate_fn=pad_collate)
    train = DataLoader(
        train_set, batch_size=batch_size, sampler=dist.train_sampler(train_set, seed), drop_last=True, generator=generator, **common
    )
    val = DataLoader(val_set, batch_size=batch_size, sampler=dist.ShardSampler(val_set), **common)
    return train, val
