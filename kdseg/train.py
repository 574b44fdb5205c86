"""The training loop: SGD with 1x / 10x parameter groups, poly lr per iteration, AMP, eval, checkpoints.

Read it top to bottom: ``Trainer.fit`` is one loop over epochs and batches.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdseg import dist
from kdseg.checkpoint import save_checkpoint
from kdseg.data.classes import IGNORE_INDEX, VOC_CLASSES
from kdseg.metrics import ConfusionMatrix


class PolyLR(LambdaLR):
    """``lr * (1 - it / max_iters) ** power``, stepped once per iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9, last_epoch: int = -1) -> None:
        self.max_iters, self.power = max_iters, power
        super().__init__(optimizer, lambda it: max(0.0, 1 - it / max_iters) ** power, last_epoch)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for an unavailable CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={device} but CUDA is not available here; use trainer.device=auto or cpu")
    return dev


def amp_policy(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for ``trainer.amp``.

    ``auto`` is bf16 on CUDA devices that support it, fp16 on older CUDA devices, off on CPU.
    Only fp16 needs loss scaling.
    """
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"trainer.amp must be auto, bf16, fp16 or off, got '{amp}'")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return dtype, dtype == torch.float16


def param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """Encoder at ``lr``; everything else (ASPP, decoder, head) at ``head_lr_mult * lr``."""
    encoder = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    return [{"params": encoder, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix over the whole loader.

    A sharded loader (DDP) is evaluated by all ranks together: the matrices are summed.
    """
    was_training = model.training
    model.eval()
    dist.sync_buffers(model, loader)
    matrix = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for images, masks in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        matrix.update(logits.argmax(1), masks)
    dist.reduce_confusion(matrix.mat, loader)
    model.train(was_training)
    return matrix.compute()


def epoch_metrics(result: dict[str, Any], class_names: tuple[str, ...] = VOC_CLASSES, prefix: str = "val") -> dict[str, float]:
    """Flatten an ``evaluate`` result into ``val/miou``, ``val/pixel_acc``, ``val/iou/<class>``."""
    out = {f"{prefix}/miou": result["miou"], f"{prefix}/pixel_acc": result["pixel_acc"]}
    for i, iou in enumerate(result["iou"]):
        name = class_names[i] if i < len(class_names) else str(i)
        if iou == iou:
            out[f"{prefix}/iou/{name}"] = iou
    return out


class Trainer:
    """Trains ``model.student`` through a :class:`~kdseg.distill.Distiller`-like module.

    ``model(images, masks)`` must return ``(total_loss, {term: loss}, logits)`` and expose
    the network being trained as ``model.student``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader,
        *,
        cfg: Any,
        epochs: int,
        num_classes: int,
        out_dir: str | os.PathLike,
        model_config: dict,
        log: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.student = model.student
        self.amp_dtype, use_scaler = amp_policy(cfg.amp, self.device)
        channels_last = cfg.channels_last == "auto" and self.device.type == "cuda" or cfg.channels_last is True
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = dist.wrap_model(self.model, self.device, cfg.sync_bn)  # DDP when world size > 1
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.num_classes = num_classes
        self.epochs = epochs
        self.max_iters = epochs * len(train_loader)
        if cfg.max_iters is not None:
            self.max_iters = min(self.max_iters, cfg.max_iters)
            self.epochs = -(-self.max_iters // len(train_loader))
        lr = cfg.base_lr * cfg.batch_size * dist.world_size() / cfg.base_batch  # linear in the global batch
        self.optimizer = instantiate(cfg.optimizer)(param_groups(self.student, lr, cfg.head_lr_mult), lr=lr)
        self.scheduler = instantiate(cfg.scheduler)(self.optimizer, max_iters=self.max_iters)
        self.out_dir = Path(out_dir)
        self.model_config = model_config
        self.log = log
        self.iteration = 0
        self.best_miou = -1.0
        self.history: list[dict[str, float]] = []

    def fit(self) -> dict[str, Any]:
        """Train for the budget; returns the final and best metrics and the checkpoint paths."""
        cfg = self.cfg
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        for epoch in range(1, self.epochs + 1):
            self.model.train()
            dist.set_epoch(self.train_loader, epoch)
            t0, seen, steps = time.perf_counter(), 0, 0
            sums: dict[str, torch.Tensor] = {}
            bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=not cfg.progress)
            for images, masks in bar:
                if self.iteration >= self.max_iters:
                    break
                images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
                masks = masks.to(self.device, non_blocking=True)
                with autocast:
                    loss, parts, _ = self.model(images, masks)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.iteration += 1
                seen += images.shape[0]
                steps += 1
                for name, value in {"loss": loss.detach(), **{f"loss_{k}": v for k, v in parts.items()}}.items():
                    sums[name] = sums.get(name, 0.0) + value.float()
                if cfg.progress and self.iteration % 10 == 0:
                    bar.set_postfix({k: f"{v.item():.3g}" for k, v in parts.items()})
            elapsed = time.perf_counter() - t0
            sums, seen = dist.reduce_epoch(sums, seen)
            metrics = {f"train/{k}": float(v) / max(steps, 1) for k, v in sums.items()}
            metrics |= {
                "train/lr": self.optimizer.param_groups[0]["lr"],
                "time/epoch_s": elapsed,
                "throughput/img_s": seen / elapsed if elapsed > 0 else 0.0,
            }
            if epoch % cfg.eval_every == 0 or epoch == self.epochs:
                result = evaluate(self.student, self.val_loader, self.num_classes, self.device, self.amp_dtype, cfg.progress)
                metrics |= epoch_metrics(result)
                improved = result["miou"] > self.best_miou
                self.best_miou = max(self.best_miou, result["miou"])
                if improved:
                    self.save("best.pt", epoch, result)
                self.save("last.pt", epoch, result)
                print(
                    f"epoch {epoch}/{self.epochs}  loss {metrics['train/loss']:.4f}  "
                    f"val mIoU {100 * result['miou']:.2f}  pixel acc {100 * result['pixel_acc']:.2f}  ({elapsed:.0f}s)",
                    flush=True,
                )
            self.history.append(metrics)
            self.log(metrics, epoch)
        final = self.history[-1]
        return {
            "final_miou": final["val/miou"],
            "best_miou": self.best_miou,
            "pixel_acc": final["val/pixel_acc"],
            "best_checkpoint": self.out_dir / "best.pt",
            "last_checkpoint": self.out_dir / "last.pt",
            "history": self.history,
        }

    def save(self, name: str, epoch: int, result: dict[str, Any]) -> Path:
        """Write a checkpoint that ``kdseg.checkpoint.load_model`` can rebuild on its own (rank 0 only)."""
        if not dist.is_main():
            return self.out_dir / name
        return save_checkpoint(
            self.out_dir / name,
            state_dict=self.student.state_dict(),
            model=self.model_config,
            metrics={"miou": result["miou"], "pixel_acc": result["pixel_acc"], "iou": result["iou"], "epoch": epoch},
            epoch=epoch,
            iteration=self.iteration,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            best_miou=self.best_miou,
        )
