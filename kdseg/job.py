"""One training job, as every task runs it: plan the run folder, build seeded loaders and a Trainer,
train (or resume), log checkpoints, skipped samples and real-time figures.

Shared by the tasks (:mod:`kdseg.tasks`) and the teacher cache (:mod:`kdseg.teacher`), which
trains a teacher as a job of its own.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from kdseg import dist
from kdseg.checkpoint import Upload, load_checkpoint, load_model, save_student
from kdseg.data import build_loaders
from kdseg.data.classes import dataset_classes
from kdseg.data.dataset import OnBadSample
from kdseg.distill import Distiller, active_terms, term_label
from kdseg.errors import KdsegError
from kdseg.models import INPUT_MULTIPLE, input_multiple, model_name
from kdseg.profile import cached_model_stats, stats_metrics
from kdseg.report import TERM_WEIGHT
from kdseg.resume import Plan, plan_run, run_config
from kdseg.runtime import auto_flag, seed_everything
from kdseg.sweep import current_sweep, parent_tags
from kdseg.tracking import Tracker
from kdseg.tracking.fields import source_tags
from kdseg.train import Trainer


@dataclass
class FitResult:
    """A finished training job: its metrics and checkpoints, and the val loader it evaluated on (for figures)."""

    final_miou: float
    best_miou: float
    history: list[dict[str, float]]
    best_checkpoint: Path
    last_checkpoint: Path
    val_loader: DataLoader


def build(node: DictConfig) -> Any:
    """``instantiate`` that lets a kdseg error through as itself (Hydra wraps it otherwise)."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, KdsegError):
            raise err.__cause__ from None
        raise


def write_config(cfg: DictConfig, out_dir: Path) -> None:
    """The resolved config as ``config.yaml`` in the run folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def plan_for(cfg: DictConfig, config: dict[str, Any] | None = None) -> Plan:
    """Where this training run writes, and the checkpoint it resumes from (``trainer.resume``).

    ``config`` is the flattened config that identifies the run and its checkpoints store
    (default: :func:`~kdseg.resume.run_config` of ``cfg``; a teacher's run passes its own).

    Under DDP rank 0 decides and the other ranks follow it (same folder, same checkpoint,
    which each rank loads itself).
    """
    plan, error = None, None
    if dist.is_main():
        try:
            plan = plan_run(cfg.trainer.resume, cfg.paths.output_dir, run_config(cfg) if config is None else config, cfg.paths.cache_dir)
        except KdsegError as err:
            error = err
    if dist.world_size() > 1:  # rank 0's plan, or its error message
        shared = dist.broadcast_object(str(error) if plan is None else (plan.out_dir, plan.config, plan.run_uid, plan.checkpoint_path))
        if error is None and isinstance(shared, str):
            raise KdsegError(f"rank 0 could not plan this run: {shared}")
        if not dist.is_main():
            out_dir, config, run_uid, path = shared
            plan = Plan(out_dir, config, run_uid, load_checkpoint(path) if path else None, path)
    if error is not None:
        raise error
    if dist.is_main():
        write_config(cfg, plan.out_dir)
        if plan.resuming:
            position = plan.checkpoint.get("position")
            where = f"step {position['steps']} of epoch {position['epoch']}" if position else f"epoch {plan.checkpoint['epoch']}"
            print(f"resuming {plan.out_dir} after {where} ({plan.checkpoint_path.name})", flush=True)
    return plan


def config_model_name(config: Mapping[str, Any], node: str) -> str:
    """:func:`~kdseg.models.model_name` of the model node ``node`` (``student``, ``teacher.model``) of a
    flattened config; ``-`` where the config does not name its encoder."""
    encoder = config.get(f"{node}.encoder_name")
    if encoder is None:
        return "-"
    arch = config.get(f"{node}.arch")
    return model_name({"encoder_name": str(encoder)} | ({"arch": arch} if arch else {}))


def model_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """What a training run's flattened config (:func:`~kdseg.resume.run_config`) trains, as MLflow tags:
    task, student, teacher, loss, dataset and seed.

    A teacher's run (``task=teacher``) has no student, loss ``ce`` and the seed it trains with
    (``teacher.train.seed``); a key the config lacks is ``-``.
    """
    task = str(config.get("task", "-"))
    distill = task == "distill"
    weights = {m.group(1): float(value) for key, value in config.items() if (m := TERM_WEIGHT.match(key))}
    seed = config.get("teacher.train.seed" if task == "teacher" else "seed", "-")
    return {
        "task": task,
        "student": config_model_name(config, "student") if distill else "-",
        "teacher": str(config.get("teacher.pretrained") or config_model_name(config, "teacher.model")),
        "loss": term_label(active_terms(weights)) if distill else "ce",
        "dataset": str(config.get("dataset.name", "-")),
        "seed": str(seed),
    }


def tags_for(config: Mapping[str, Any], *, shared: bool = False, run_dir: str | Path | None = None) -> dict[str, str]:
    """The MLflow tags of a run of the flattened ``config``: :func:`model_tags`, MLflow's source fields
    (:func:`~kdseg.tracking.fields.source_tags`), its folder and, in a multirun, its sweep and parent run.

    ``shared``: a run that serves every sweep (the cached teacher) is not one sweep's member (nor
    nested under one); the sweep that first needed it is kept as ``first_needed_by_sweep``.
    """
    sweep_id, sweep_dir = current_sweep()
    if shared:
        sweep = {"first_needed_by_sweep": sweep_id} if sweep_id else {}
    else:
        sweep = {"sweep_id": sweep_id, "sweep_dir": sweep_dir} | parent_tags() if sweep_id else {}
    return model_tags(config) | source_tags() | sweep | ({"run_dir": str(Path(run_dir).resolve())} if run_dir else {})


def loaders_for(model: Distiller, datasets: tuple, trainer_cfg: DictConfig, seed: int, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The seeded train and val loaders of a training job (:func:`~kdseg.data.build_loaders`), val
    images padded to a size that fits both networks."""
    networks = (model.student, model.teacher) if model.teacher is not None else (model.student,)
    return build_loaders(
        *datasets, trainer_cfg.batch_size, trainer_cfg.num_workers, seed,
        pin_memory=auto_flag(trainer_cfg.pin_memory, device), persistent_workers=trainer_cfg.persistent_workers,
        stride=math.lcm(INPUT_MULTIPLE, *(input_multiple(net) for net in networks)),  # val images fit both networks
    )


def fit_steps(
    cfg: DictConfig,
    tracker: Tracker,
    model: Distiller,
    datasets: tuple,
    plan: Plan,
    device: torch.device,
    *,
    trainer_cfg: DictConfig,
    epochs: int,
    model_cfg: dict,
    seed: int,
    record: dict[str, Any] | None = None,
    loaders: Callable[[Distiller], tuple[Any, DataLoader]] | None = None,
    log_model: bool = False,
) -> Generator[Trainer | None, None, FitResult]:
    """Build seeded loaders and a Trainer (``trainer_cfg``: the student's ``trainer`` or a teacher's
    settings), train (or resume) for ``epochs``, and log the run's checkpoints; paused where
    :meth:`Trainer.steps <kdseg.train.Trainer.steps>` pauses (``drain(fit_steps(...))`` runs it through).

    ``record`` is the flattened training config the checkpoints store (default: the plan's), which
    ``task=eval`` reads back to describe the model. ``loaders`` gives the model's (train, val)
    loaders instead of building them (a fused sweep: every member reads one shared train loader,
    :mod:`kdseg.fused`). ``log_model``: the best epoch's model is uploaded as an MLflow model
    (:func:`upload_checkpoints`).
    """
    seed_everything(seed + dist.rank())  # augmentations differ by rank; DDP starts every rank from rank 0's weights
    if loaders is None:
        train_loader, val_loader = loaders_for(model, datasets, trainer_cfg, seed, device)
    else:
        train_loader, val_loader = loaders(model)
    run_info = {"run_uid": plan.run_uid, "fingerprint": plan.fingerprint, "mlflow_run_id": tracker.run_id,
                "config": plan.config if record is None else record}
    trainer = Trainer(
        model, train_loader, val_loader, cfg=trainer_cfg, epochs=epochs,
        num_classes=cfg.dataset.num_classes, class_names=dataset_classes(cfg.dataset.name).names,
        out_dir=plan.out_dir, model_config=model_cfg,
        log=tracker.log_metrics, device=device, run_info=run_info, eval_cfg=cfg.eval,
    )
    if plan.resuming:
        trainer.restore(plan.checkpoint, plan.checkpoint_path)
        logged = tracker.logged_steps("train/loss") if tracker.run_id else set()
        for epoch, metrics in enumerate(trainer.history, start=1):
            if tracker.run_id and epoch not in logged:
                tracker.log_metrics(metrics, epoch)  # killed between its checkpoint and its log
    with trainer.stop_signals():
        out = yield from trainer.steps()
    result = FitResult(out["final_miou"], out["best_miou"], out["history"], out["best_checkpoint"], out["last_checkpoint"], val_loader)
    upload_checkpoints(cfg, tracker, result, log_model, final_student=(model.student, model_cfg))
    return result


def upload_checkpoints(cfg: DictConfig, tracker: Tracker, result: FitResult, log_model: bool = False,
                       final_student: tuple[nn.Module, dict] | None = None) -> None:
    """What of a finished run's checkpoints goes to MLflow (``logger.log_checkpoints``): ``all``, both
    training states; ``student`` (the default), the best epoch's weights once: as an MLflow PyTorch
    model named ``student`` with ``log_model`` (``logger.log_model``), else as ``checkpoints/best_student.pt``
    (also where the model cannot be logged); ``none``, no checkpoint. ``log_model`` logs the model
    whatever ``log_checkpoints`` says. The run folder keeps everything.

    ``final_student``: the trained network and its model config as the run ended, what ``best.pt``
    holds when the last epoch was the best (``last.pt`` is then the same file), so that
    best_student.pt is then written without reading ``best.pt`` back (its weights on the CPU either way)."""
    upload = Upload(cfg.logger.log_checkpoints)
    best = result.best_checkpoint
    if upload == Upload.all:
        for path in (best, result.last_checkpoint):
            tracker.log_artifact(path, "checkpoints")
    if not (tracker.enabled and tracker.run_id and best.is_file()) or not (log_model or upload == Upload.student):
        return
    if final_student is not None and same_file(best, result.last_checkpoint):
        network, model_cfg = final_student
        ckpt = {"model": model_cfg, "state_dict": {key: value.cpu() for key, value in network.state_dict().items()}}
    else:
        ckpt = load_checkpoint(best)
    student = save_student(best.with_name(f"{best.stem}_student.pt"), ckpt)
    logged = log_model and log_student_model(tracker, student, cfg.dataset.crop_size) is not None
    if upload == Upload.student and not logged:
        tracker.log_artifact(student, "checkpoints")


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (a checkpoint linked under two names); False where either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def log_student_model(tracker: Tracker, path: Path, size: int) -> str | None:
    """The model of the checkpoint ``path`` as an MLflow PyTorch model named ``student``, with a
    signature and an input example of one image at ``size`` x ``size``; its URI, for
    ``mlflow.pytorch.load_model``, or None where the store refused it."""
    model, _ = load_model(path)
    example = torch.zeros(1, 3, size, size).numpy()
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"segmentation-models-pytorch=={smp.__version__}"]
    uri = tracker.log_model(model.cpu().eval(), example, "student", requirements)
    if uri:
        print(f"student logged as an MLflow model: mlflow.pytorch.load_model('{uri}')", flush=True)
    return uri


def log_skipped(cfg: DictConfig, tracker: Tracker, datasets: tuple, plan: Plan) -> None:
    """With ``dataset.on_bad_sample=skip``: list the left-out samples in bad_samples.txt, log their count."""
    if cfg.dataset.on_bad_sample != OnBadSample.skip or plan.resuming:
        return
    counts = {f"data/skipped_{split}": len(ds.skipped) for split, ds in zip(("train", "val"), datasets)}
    tracker.log_metrics(counts, 0)
    lines = [f"{split}\t{p.path}\t{p.message}\n" for split, ds in zip(("train", "val"), datasets) for p in ds.skipped]
    if lines:
        path = plan.out_dir / "bad_samples.txt"
        path.write_text("".join(lines))
        tracker.log_artifact(path)
        print(f"warning: skipped {len(lines)} bad sample(s) (train {counts['data/skipped_train']}, "
              f"val {counts['data/skipped_val']}); listed in {path}", flush=True)


SPEED_MODELS = {"student": "student", "teacher": "teacher.model"}
"""The config node of each model whose real-time figures a run logs."""


def log_speed(cfg: DictConfig, tracker: Tracker, models: dict[str, nn.Module | None], device: torch.device) -> None:
    """Log each model's real-time figures at ``dataset.eval_size`` as ``speed/<name>_*``.

    The figures are the model's, not the run's: measured once per model config, size and device
    and read from ``<paths.cache_dir>/speed/`` by every later run (:func:`~kdseg.profile.cached_model_stats`).
    """
    if not cfg.speed.enabled:
        return
    size = tuple(cfg.dataset.eval_size)
    method = (f"min over up to {cfg.speed.rounds} rounds of the median of {cfg.speed.repeats} passes, "
              "measured once per model config, size, device and torch version")
    for name, model in models.items():
        if model is not None:
            node = OmegaConf.to_container(OmegaConf.select(cfg, SPEED_MODELS[name]), resolve=True)
            node.pop("encoder_weights", None)  # the weights' origin does not change the speed
            stats, path = cached_model_stats(
                model, node, size, device, cfg.paths.cache_dir, cfg.speed.repeats, cfg.speed.warmup, cfg.speed.rounds,
            )
            tracker.log_metrics({k: v for k, v in stats_metrics(stats, name).items() if k.startswith("speed/")}, 0)
            tracker.set_tags({f"speed_{name}_cache": str(path)})
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tracker.set_tags({"speed_device": f"{where}, batch 1 at {size[0]}x{size[1]}", "speed_method": method})
