"""The training loop: SGD with 1x / 10x parameter groups, poly lr per iteration, AMP, eval, checkpoints.

Read it top to bottom: ``Trainer.steps`` is one loop over epochs and batches (``Trainer.fit`` runs it
through; a fused sweep advances several trainers' loops one step each in turn).
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdseg import dist
from kdseg.checkpoint import check_model, load_weights, save_checkpoint
from kdseg.data.classes import IGNORE_INDEX, VOC_CLASSES
from kdseg.errors import CheckpointError, DeviceMemoryError, NonFiniteLossError, TrainingInterrupted
from kdseg.inference import EvalSettings, eval_settings, predict
from kdseg.losses.base import Progress, Term, labelled
from kdseg.memory import peak_memory, reset_peak_memory
from kdseg.metrics import ConfusionMatrix
from kdseg.runtime import amp_policy, auto_flag, resolve_device, rng_state, set_rng_state
from kdseg.utils import drain

NONFINITE_CHECK_EVERY = 10
"""Iterations between checks for a NaN / inf loss (each check is one device sync)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that stop training cleanly: what SLURM sends on ``scancel`` / pre-emption and, with
``#SBATCH --signal``, before the time limit."""
STOP_CHECK_EVERY_DDP = NONFINITE_CHECK_EVERY
"""Under DDP, iterations between the collective that lets every rank agree to stop on a signal."""


class PolyLR(LambdaLR):
    """``lr * (1 - it / max_iters) ** power``, stepped once per iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9, last_epoch: int = -1) -> None:
        super().__init__(optimizer, lambda it: max(0.0, 1 - it / max_iters) ** power, last_epoch)


def param_groups(model: nn.Module, lr: float, head_lr_mult: float, extra: nn.Module | None = None) -> list[dict]:
    """Encoder at ``lr``; everything else (ASPP, decoder, head) at ``head_lr_mult * lr``.

    ``extra`` (the loss terms' learned parts, e.g. FitNet's adapter) trains at the head's rate,
    as a third group when it has parameters.
    """
    encoder = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    groups = [{"params": encoder, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]
    learned = [p for p in extra.parameters() if p.requires_grad] if extra is not None else []
    if learned:
        groups.append({"params": learned, "lr": lr * head_lr_mult})
    return groups


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    eval_cfg: Any = None,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix over the whole loader.

    ``eval_cfg`` (the ``eval`` config) picks how each batch is predicted
    (:func:`kdseg.inference.predict`); ``None`` is one pass of the model on the whole image.

    The matrix is accumulated on ``device`` and read back once at the end (no per-batch sync).
    A sharded loader (DDP) is evaluated by all ranks together: the matrices are summed.
    """
    settings = eval_settings(eval_cfg)
    was_training = model.training
    model.eval()
    dist.sync_buffers(model, loader)
    matrix = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for images, masks in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast:
            logits = predict(model, images, settings)
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


class NonFiniteGuard:
    """Watches every iteration's loss terms for NaN / inf without a device sync per iteration.

    ``add`` keeps the (detached) values on the device; ``check`` looks at all kept ones at
    once and raises :class:`~kdseg.errors.NonFiniteLossError` naming the first bad term and
    its iteration.
    """

    def __init__(self) -> None:
        self.kept: list[tuple[int, list[str], torch.Tensor]] = []

    def add(self, iteration: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        names = [*parts, "total"]
        self.kept.append((iteration, names, torch.stack([*(v.float() for v in parts.values()), total.detach().float()])))

    def check(self, where: str = "") -> None:
        if not self.kept:
            return
        finite = bool(torch.stack([values for _, _, values in self.kept]).isfinite().all())
        if dist.all_true(finite):  # under DDP every rank stops together, or none does
            self.kept.clear()
            return
        for iteration, names, values in self.kept:
            bad = [(name, v) for name, v in zip(names, values.tolist()) if not math.isfinite(v)]
            if bad:
                terms = ", ".join(f"{'loss' if name == 'total' else 'loss_' + name} = {v}" for name, v in bad)
                raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: {terms}; training stopped{where}")
        last = self.kept[-1][0]
        raise NonFiniteLossError(f"non-finite loss on another DDP process by iteration {last}; training stopped{where}")


class Trainer:
    """Trains ``model.student`` through a :class:`~kdseg.distill.Distiller`-like module.

    ``model(images, masks)`` must return ``(total_loss, {term: loss}, logits)`` and expose
    the network being trained as ``model.student``. After every epoch ``last.pt`` holds
    the full training state (weights, optimizer, lr schedule, AMP scaler, epoch, iteration,
    best metric, metric history, RNG states) and :meth:`restore` continues from it.

    It sets nothing process-wide: threads and cuDNN flags are the task's
    (:func:`kdseg.runtime.configure_backends`, once when it starts).
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
        class_names: tuple[str, ...] = VOC_CLASSES,
        out_dir: str | os.PathLike,
        model_config: dict,
        log: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
        device: torch.device | None = None,
        run_info: dict | None = None,
        eval_cfg: Any = None,
    ) -> None:
        self.cfg = cfg
        self.eval_settings: EvalSettings = eval_settings(eval_cfg)  # how every per-epoch evaluation predicts
        self.device = device or resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.student = model.student
        self.terms: nn.Module | None = getattr(model, "terms", None)  # learned parts of loss terms (adapters)
        self.ignore_index: int = getattr(model, "ignore_index", IGNORE_INDEX)
        self.amp_dtype, use_scaler = amp_policy(cfg.amp, self.device)
        channels_last = auto_flag(cfg.channels_last, self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if cfg.compile:
            self.student.compile(mode=cfg.compile_mode)
        self.model = dist.wrap_model(self.model, self.device, cfg.sync_bn)  # DDP when world size > 1
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.num_classes = num_classes
        self.class_names = class_names  # names of the val/iou/<class> metrics
        self.epochs = epochs
        self.max_iters = epochs * len(train_loader)
        if cfg.max_iters is not None:
            self.max_iters = min(self.max_iters, cfg.max_iters)
            self.epochs = -(-self.max_iters // len(train_loader))
        lr = cfg.base_lr * cfg.batch_size * dist.world_size() / cfg.base_batch  # linear in the global batch
        self.optimizer = instantiate(cfg.optimizer)(param_groups(self.student, lr, cfg.head_lr_mult, self.terms), lr=lr)
        self.scheduler = instantiate(cfg.scheduler)(self.optimizer, max_iters=self.max_iters)
        self.out_dir = Path(out_dir)
        self.model_config = model_config
        self.log = log
        self.run_info = run_info or {}
        self.start_epoch = 1
        self.iteration = 0
        self.best_miou = -1.0
        self.last_result: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        self.guard = NonFiniteGuard()
        self.stop_signal: str | None = None
        self.position: dict | None = None  # where a checkpoint written mid-epoch stopped (see save_position)
        self.prefix = ""  # before each epoch line (a fused sweep names the student it is about)
        self.loader_generator: torch.Generator | None = getattr(train_loader, "generator", None)

    @contextmanager
    def stop_signals(self) -> Iterator[None]:
        """While training, SIGTERM and SIGUSR1 only set ``stop_signal``: the loop finishes its step,
        writes a checkpoint of its position and raises :class:`TrainingInterrupted` (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: object) -> None:
            self.stop_signal = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_requested(self, every: int = 1) -> bool:
        """Whether a stop signal arrived (under DDP: on any rank, asked every ``every`` iterations so all ranks agree)."""
        if dist.world_size() == 1:
            return self.stop_signal is not None
        if self.iteration % every:
            return False
        return not dist.all_true(self.stop_signal is None)

    def interrupted(self, epoch: int, steps: int, checkpoint: Path) -> TrainingInterrupted:
        """The one-line error a stop signal ends training with: where it stopped and how to go on."""
        where = f"after step {steps} of epoch {epoch}" if steps else f"after epoch {epoch}"
        return TrainingInterrupted(
            f"stopped by {self.stop_signal or 'a signal on another DDP process'} {where} (iteration {self.iteration}); "
            f"'{checkpoint}' holds this position: run the same command again to continue from it"
        )

    def restore(self, ckpt: dict, path: str | os.PathLike = "checkpoint") -> None:
        """Continue from a checkpoint written by :meth:`save`: the run goes on as if never stopped."""
        check_model(path, ckpt, {k: self.model_config[k] for k in ("encoder_name", "classes", "output_stride")})
        load_weights(path, self.student, ckpt)
        if self.terms is not None:
            try:
                self.terms.load_state_dict(ckpt.get("terms", {}))
            except RuntimeError as err:
                raise CheckpointError(
                    f"checkpoint '{path}' does not hold the learned parts of this run's loss terms: {str(err).splitlines()[0]}"
                ) from err
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = ckpt["epoch"] + 1
        self.iteration = ckpt["iteration"]
        self.best_miou = ckpt["best_miou"]
        self.history = list(ckpt["history"])
        self.last_result = ckpt["metrics"] or None
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        same_world = len(ranks) == dist.world_size()  # else (world size changed) rank 0's states
        mine = dist.rank() if same_world else 0
        set_rng_state(ranks[mine], self.train_loader.generator)
        if ckpt.get("position"):
            position = ckpt["position"]
            self.position = {key: position[key] for key in ("epoch", "steps", "seen", "skipped", "void")}
            self.position |= {"sums": position["sums"][mine], "loader": position["loader"][mine], "rng": ranks[mine]}

    def resume_position(self, epoch: int, batches: Iterator) -> dict | None:
        """Continue epoch ``epoch`` where a mid-epoch checkpoint stopped; returns its counters
        (``steps``, ``sums``, ``seen``, ``skipped``, ``void``), or None (the epoch starts afresh).

        ``batches`` (the epoch's loader iterator, not yet started, its generator already set back to
        the epoch's start) skips the batches already trained on: they are loaded again and dropped
        (their augmentations draw what they drew); then every RNG is set to its state at the stop,
        so the rest of the epoch is bit-identical to an uninterrupted run.
        """
        position, self.position = self.position, None
        if position is None or position["epoch"] != epoch:
            return None
        for _ in range(position["steps"]):
            next(batches)
        set_rng_state(position["rng"], self.loader_generator)
        return position | {"sums": {name: value.to(self.device) for name, value in position["sums"].items()}}

    def fit(self) -> dict[str, Any]:
        """Train for the budget; returns the final and best metrics and the checkpoint paths.

        SIGTERM / SIGUSR1 stop it cleanly (:meth:`stop_signals`): after the current step a checkpoint
        of the position within the epoch is written, from which :meth:`restore` continues bit-exactly.
        """
        with self.stop_signals():
            return drain(self.steps())

    def steps(self) -> Generator[Trainer | None, None, dict[str, Any]]:
        """:meth:`fit`'s loop, paused once before the first epoch and after every training step;
        returns what :meth:`fit` returns. The first pause yields the trainer itself. A fused sweep
        (:mod:`kdseg.fused`) advances several trainers in turn, one step each, on the same batches."""
        cfg = self.cfg
        yield self  # ready: restored, nothing trained yet
        reset_peak_memory(self.device)  # memory/peak_mib: this run's peak (CUDA allocated or resident set)
        for epoch in range(self.start_epoch, self.epochs + 1):
            self.model.train()
            dist.set_epoch(self.train_loader, epoch)
            t0, seen, steps, skipped, void = time.perf_counter(), 0, 0, 0, 0
            sums: dict[str, torch.Tensor] = {}
            bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, disable=not cfg.progress)
            batches = iter(bar)
            resuming = self.position is not None and self.position["epoch"] == epoch
            if resuming and self.loader_generator is not None:
                self.loader_generator.set_state(self.position["loader"])
            # the generator before the epoch's loader draws from it: a mid-epoch checkpoint rebuilds the epoch from it
            loader_start = self.loader_generator.get_state() if self.loader_generator is not None else None
            resumed = self.resume_position(epoch, batches)
            if resumed is not None:
                steps, sums, seen, skipped, void = (resumed[key] for key in ("steps", "sums", "seen", "skipped", "void"))
            for images, masks in batches:
                if self.iteration >= self.max_iters:
                    break
                self.tell_progress(epoch)
                void += not labelled(masks, self.ignore_index)  # on the loader's CPU tensor: no device sync
                try:
                    loss, parts, step_skipped = self.train_step(images, masks)
                except torch.cuda.OutOfMemoryError:
                    raise DeviceMemoryError(self.out_of_memory_note(images)) from None
                skipped += step_skipped
                self.guard.add(self.iteration, loss, parts)
                if self.iteration % NONFINITE_CHECK_EVERY == 0:
                    self.guard.check(self.stop_note())
                seen += images.shape[0]
                steps += 1
                for name, value in {"loss": loss.detach(), **{f"loss_{k}": v for k, v in parts.items()}}.items():
                    sums[name] = sums.get(name, 0.0) + value.float()
                if cfg.progress and self.iteration % 10 == 0:
                    bar.set_postfix({k: f"{v.item():.3g}" for k, v in parts.items()})
                if self.stop_requested(STOP_CHECK_EVERY_DDP) and self.iteration < self.max_iters:
                    self.guard.check(self.stop_note())  # nothing non-finite is saved
                    path = self.save_position(epoch, steps, sums, seen, skipped, void, loader_start)
                    raise self.interrupted(epoch, steps, path)
                yield
            self.guard.check(self.stop_note())
            elapsed = time.perf_counter() - t0
            sums, counts = dist.reduce_epoch(sums, {"seen": seen, "void": void})
            seen = counts["seen"]
            metrics = {f"train/{k}": float(v) / max(steps, 1) for k, v in sums.items()}
            metrics |= {
                "train/lr": self.optimizer.param_groups[0]["lr"],
                "time/epoch_s": elapsed,
                "throughput/img_s": seen / elapsed if elapsed > 0 else 0.0,
                "train/void_batches": counts["void"],  # batches without a labelled pixel: CE (and masked terms) 0
            }
            if self.scaler.is_enabled():
                metrics["train/amp_skipped_steps"] = skipped
            improved = False
            if epoch % cfg.eval_every == 0 or epoch == self.epochs:
                result = evaluate(self.student, self.val_loader, self.num_classes, self.device, self.amp_dtype, cfg.progress, self.eval_settings)
                metrics |= epoch_metrics(result, self.class_names)
                self.last_result = result
                improved = result["miou"] > self.best_miou
                self.best_miou = max(self.best_miou, result["miou"])
                print(
                    f"{self.prefix}epoch {epoch}/{self.epochs}  loss {metrics['train/loss']:.4f}  "
                    f"val mIoU {100 * result['miou']:.2f}  pixel acc {100 * result['pixel_acc']:.2f}  ({elapsed:.0f}s)",
                    flush=True,
                )
            metrics["memory/peak_mib"] = peak_memory(self.device)
            self.history.append(metrics)
            best = self.save("best.pt", epoch) if improved else None
            self.save("last.pt", epoch, keep_previous=True, same_as=best)  # the same state: a link to best.pt
            self.log(metrics, epoch)
            if epoch < self.epochs and self.stop_requested():
                raise self.interrupted(epoch, 0, self.out_dir / "last.pt")
        final = self.history[-1]
        return {
            "final_miou": final["val/miou"],
            "best_miou": self.best_miou,
            "pixel_acc": final["val/pixel_acc"],
            "best_checkpoint": self.out_dir / "best.pt",
            "last_checkpoint": self.out_dir / "last.pt",
            "history": self.history,
        }

    def autocast(self) -> AbstractContextManager:
        """The mixed-precision context that ``trainer.amp`` asks for (a no-op when it is off)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def tell_progress(self, epoch: int) -> None:
        """Give every loss term the step's :class:`~kdseg.losses.base.Progress` (derived from the
        epoch and iteration that a resume restores, so a resumed run sees what an uninterrupted one would)."""
        if self.terms is None:
            return
        progress = Progress(epoch, self.epochs, self.iteration, self.max_iters)
        for term in self.terms.children():
            if isinstance(term, Term):
                term.set_progress(progress)

    def train_step(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        """One optimisation step on a batch; returns the detached total loss, its parts, and
        whether fp16's GradScaler skipped the step (gradients overflowed: normal, counted).

        Nothing here waits for the device (no ``.item()``), so CUDA steps queue back to back;
        the one exception is fp16's GradScaler, which reads its overflow check back.
        """
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        masks = masks.to(self.device, non_blocking=True)
        with self.autocast():
            loss, parts = self.model(images, masks)[:2]  # the logits are not kept through backward
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = scale is not None and self.scaler.get_scale() < scale
        self.scheduler.step()
        self.iteration += 1
        return loss.detach(), parts, skipped

    def out_of_memory_note(self, images: torch.Tensor) -> str:
        """One line for a CUDA out-of-memory error in a training step: the batch, the crop, the switches that lower memory."""
        amp = "off" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        channels_last = str(self.memory_format == torch.channels_last).lower()
        h, w = images.shape[-2:]
        return (
            f"CUDA out of memory in training step {self.iteration + 1} on {self.device} with a per-process batch of "
            f"{images.shape[0]} images (trainer.batch_size={self.cfg.batch_size}) of {h}x{w} (dataset.crop_size); lower it "
            f"with trainer.amp=bf16 (now {amp}), trainer.channels_last=true (now {channels_last}), or a smaller "
            "trainer.batch_size with the same global batch over more processes (torchrun --nproc_per_node=N)"
            f"{self.stop_note()}"
        )

    def stop_note(self) -> str:
        """Where a run stopped by a bad loss can be picked up again."""
        if self.history:
            return f"; the last good checkpoint is '{self.out_dir / 'last.pt'}' (epoch {len(self.history)})"
        return "; no checkpoint was written before it"

    def save_position(
        self, epoch: int, steps: int, sums: dict[str, torch.Tensor], seen: int, skipped: int, void: int, loader_start: Any
    ) -> Path:
        """``last.pt`` after step ``steps`` of epoch ``epoch``: the state :meth:`resume_position` continues from.

        Besides the usual training state (its ``epoch`` is the last finished one) it holds the
        epoch's counters so far and each rank's loader generator state at the epoch's start.
        """
        position = {
            "epoch": epoch, "steps": steps, "seen": seen, "skipped": skipped, "void": void,
            "sums": dist.gather_objects({name: value.cpu() for name, value in sums.items()}),
            "loader": dist.gather_objects(loader_start),
        }
        return self.save("last.pt", epoch - 1, keep_previous=True, position=position)

    def save(self, name: str, epoch: int, keep_previous: bool = False, same_as: Path | None = None, **extra: Any) -> Path:
        """Write a checkpoint that ``kdseg.checkpoint.load_model`` can rebuild and :meth:`restore` continue (rank 0 only).

        Under DDP it holds every rank's RNG states (``rng_ranks``), so each rank resumes its own streams.
        ``extra``: more content (a mid-epoch checkpoint's ``position``). ``same_as``: a checkpoint
        just written from this same state (this epoch's ``best.pt``), linked instead of written again.
        """
        rngs = dist.gather_objects(rng_state(self.train_loader.generator))
        if not dist.is_main():
            return self.out_dir / name
        if same_as is not None:
            return save_checkpoint(self.out_dir / name, keep_previous=keep_previous, same_as=same_as)
        result = self.last_result
        metrics = {"miou": result["miou"], "pixel_acc": result["pixel_acc"], "iou": result["iou"], "epoch": epoch} if result else {}
        return save_checkpoint(
            self.out_dir / name,
            keep_previous=keep_previous,
            state_dict=self.student.state_dict(),
            terms=self.terms.state_dict() if self.terms is not None else {},
            model=self.model_config,
            metrics=metrics,
            epoch=epoch,
            iteration=self.iteration,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            best_miou=self.best_miou,
            history=self.history,
            rng=rngs[0],
            rng_ranks=rngs,
            **self.run_info,
            **extra,
        )
