"""Datasets and loaders from the ``dataset`` and ``trainer`` config groups."""
from __future__ import annotations

from functools import partial

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from kdseg import dist
from kdseg.data.classes import IGNORE_INDEX
from kdseg.data.dataset import SegmentationDataset
from kdseg.data.folders import LAYOUTS, list_pairs
from kdseg.data.labels import LabelMap
from kdseg.data.synthetic import ensure_synthetic
from kdseg.data.transforms import train_transforms, val_transforms
from kdseg.data.voc import LAYOUT_HINT, read_split
from kdseg.errors import ConfigError, DataError, MissingDataError
from kdseg.models import INPUT_MULTIPLE
from kdseg.utils import not_a_folder


def dataset_root(cfg: DictConfig) -> Path:
    """The dataset folder; a generated dataset (``dataset.generated``: the built-in set) is written there on first use."""
    if cfg.generated:
        try:
            return ensure_synthetic(cfg.root, cfg.num_train, cfg.num_val, cfg.image_size, cfg.seed)
        except (ValueError, FileExistsError) as err:
            raise DataError(str(err)) from err
    return Path(cfg.root)


def split_samples(cfg: DictConfig, root: Path, split: str) -> tuple[list[tuple[Path, Path]], str, LabelMap | None]:
    """The (image, mask) pairs of the ``train`` or ``val`` split, where they are listed (for
    messages), and the label map of the dataset's masks (None: they store class indices).

    VOC-layout datasets list a split in a file (``train_list`` / ``val_list``); Cityscapes,
    ADE20K and CamVid are split folders (``train_split`` / ``val_split``), see :mod:`kdseg.data.folders`.
    """
    if cfg.name in LAYOUTS:
        layout, folder = LAYOUTS[cfg.name], cfg[f"{split}_split"]
        return list_pairs(root, cfg.name, folder), f"'{layout.folders(root, folder)[0]}'", layout.label_map()
    if not root.is_dir():
        raise MissingDataError(f"dataset.root '{root}' {not_a_folder(root)} (expected {LAYOUT_HINT})")
    list_file, mask_dir = (cfg.train_list, cfg.mask_dir) if split == "train" else (cfg.val_list, cfg.val_mask_dir)
    return read_split(root, list_file, cfg.image_dir, mask_dir), f"'{root / list_file}'", None


def tune_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (ascending) of the train split's samples a tuning run trains on, and of those it
    holds out and scores on: ``round(n * fraction)`` of the ``n`` samples, drawn by a generator
    seeded with ``seed`` alone (every trial of a study, whatever its own seed, sees one split)."""
    held = round(n * fraction)
    if not 1 <= held < n - 1:
        raise ConfigError(f"dataset.tune_fraction={fraction} holds out {held} of the {n} train images: "
                          "expected at least 1 held out and at least 2 left to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """Train and val datasets of the configured splits, with the METHOD.md transforms.

    With ``cfg.tune_fraction`` (a tuning run) both come from the train split, :func:`tune_split`:
    the run trains on the rest and is scored on the held-out part (with the val transforms);
    the val split is not even listed. Bad samples fail here (pre-flight scan) or are left out,
    as ``cfg.on_bad_sample`` says.
    """
    root = dataset_root(cfg)
    transforms = {
        "train": train_transforms(cfg.base_size, cfg.crop_size, tuple(cfg.scale_range), cfg.blur_prob),
        "val": val_transforms(cfg.eval_mode, cfg.base_size, cfg.crop_size),
    }
    tune_fraction = cfg.get("tune_fraction")
    if tune_fraction is not None:
        samples, source, label_map = split_samples(cfg, root, "train")
        rest, held = tune_split(len(samples), tune_fraction, cfg.tune_seed)
        where = f"{source}, tune_fraction={tune_fraction}, tune_seed={cfg.tune_seed}"
        return tuple(  # type: ignore[return-value]
            SegmentationDataset([samples[i] for i in part], f"{source} ({what} of {where})", transforms[split],
                                cfg.num_classes, cfg.on_bad_sample, label_map)
            for part, what, split in ((rest, "the part tuning trains on", "train"), (held, "the part held out for tuning", "val"))
        )
    datasets = []
    for split in ("train", "val"):
        samples, source, label_map = split_samples(cfg, root, split)
        datasets.append(SegmentationDataset(samples, source, transforms[split], cfg.num_classes, cfg.on_bad_sample, label_map))
    return datasets[0], datasets[1]


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]], stride: int = INPUT_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
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
    train_set: Dataset,
    val_set: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    stride: int = INPUT_MULTIPLE,
) -> tuple[DataLoader, DataLoader]:
    """Seeded, shuffled train loader (drops the last partial batch) and an ordered val loader.

    Every random draw of the loaders (shuffling, worker seeds) comes from their own
    generators, whose states a checkpoint saves. Train workers are started per epoch
    unless ``persistent_workers`` (so that a resumed run seeds them exactly as the
    uninterrupted run did); val workers persist. ``pin_memory`` gives page-locked batches
    that copy to a GPU asynchronously. Batches are padded to a multiple of ``stride`` (the
    models' input multiple, :func:`pad_collate`).

    ``batch_size`` is per process. Under DDP each rank loads its part of one seeded
    permutation of the train split (``kdseg.dist.train_sampler``; the trainer reshuffles
    it every epoch) and a disjoint shard of the val split; with one process the loaders
    are the plain shuffled / ordered ones.
    """
    world = dist.world_size()
    if len(train_set) // world < batch_size:
        where = f" split over {world} processes" if world > 1 else ""
        raise ConfigError(
            f"trainer.batch_size={batch_size} is larger than the train split ({len(train_set)} images{where})"
        )
    common = dict(num_workers=num_workers, pin_memory=pin_memory,
                  collate_fn=pad_collate if stride == INPUT_MULTIPLE else partial(pad_collate, stride=stride))
    sampler = dist.train_sampler(train_set, seed)  # None with one process
    train = DataLoader(
        train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(seed + dist.rank()), **common,  # worker seeds differ by rank
    )
    val = DataLoader(
        val_set, batch_size=batch_size, sampler=dist.ShardSampler(val_set), persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed), **common,
    )
    return train, val
