"""The three tasks behind ``run.py``: ``distill`` (default), ``teacher`` and ``eval``.

Each returns the final val mIoU (a fraction) so Hydra sweepers can optimise it.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdseg import dist
from kdseg.checkpoint import check_model, load_checkpoint, load_model, load_weights, model_config
from kdseg.config import validate
from kdseg.data import build_datasets, build_loaders
from kdseg.data.classes import dataset_classes
from kdseg.distill import Distiller, build_terms, term_label
from kdseg.errors import ConfigError, KdsegError
from kdseg.inference import eval_settings
from kdseg.models import count_params
from kdseg.profile import model_stats, stats_metrics
from kdseg.resume import Plan, plan_run, run_config
from kdseg.sweep import current_sweep
from kdseg.tracking import Tracker, git_commit, run_params
from kdseg.train import Trainer, auto_flag, epoch_metrics, evaluate, resolve_device, seed_everything
from kdseg.viz import save_prediction_grid

TEACHER_TRAIN_KEYS = ("teacher_epochs", "max_iters", "batch_size", "base_lr", "base_batch", "head_lr_mult", "optimizer", "scheduler", "amp")


def run(cfg: DictConfig) -> float:
    """Validate, reach the tracking store, then run ``cfg.task``; returns the final val mIoU."""
    validate(cfg)
    dist.setup(cfg)  # joins the process group under torchrun / a multi-task SLURM job; ranks > 0 go quiet
    tracker = Tracker.from_config(cfg)
    task = {"distill": distill, "teacher": train_teacher_task, "eval": eval_task}[cfg.task]
    return task(cfg, tracker)


def build(node: DictConfig) -> Any:
    """``instantiate`` that lets a kdseg error through as itself (Hydra wraps it otherwise)."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, KdsegError):
            raise err.__cause__ from None
        raise


def plan_for(cfg: DictConfig) -> Plan:
    """Where this training run writes, and the checkpoint it resumes from (``trainer.resume``).

    Under DDP rank 0 decides and the other ranks follow it (same folder, same checkpoint,
    which each rank loads itself).
    """
    plan, error = None, None
    if dist.is_main():
        try:
            plan = plan_run(cfg.trainer.resume, cfg.paths.output_dir, run_config(cfg), cfg.paths.cache_dir)
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
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        (plan.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if plan.resuming:
            print(f"resuming {plan.out_dir} after epoch {plan.checkpoint['epoch']} ({plan.checkpoint_path.name})", flush=True)
    return plan


def tags_for(cfg: DictConfig, task: str, student: str | None) -> dict[str, str]:
    sweep_id, sweep_dir = current_sweep()
    return {
        "task": task,
        "student": student or "-",
        "teacher": cfg.teacher.model.encoder_name,
        "loss": term_label([n for n, t in cfg.loss.terms.items() if t.weight > 0]) if task == "distill" else "ce",
        "dataset": cfg.dataset.name,
        "seed": str(cfg.seed),
        "sweep_id": sweep_id,
        "sweep_dir": sweep_dir,
        "git_commit": git_commit(Path(__file__).parent),
    }


def teacher_cache_path(cfg: DictConfig) -> Path:
    """Cache file of the teacher that ``cfg`` would train: keyed by data, model and training settings."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    if dataset["name"] == "synthetic":
        dataset.pop("root")
    dataset.pop("on_bad_sample")  # how bad files are handled, not which data: keeps cached teachers valid
    key = {
        "dataset": dataset,
        "model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
        "seed": cfg.teacher.seed,
        "trainer": {k: trainer[k] for k in TEACHER_TRAIN_KEYS},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir) / "teachers" / f"{cfg.teacher.model.encoder_name}-{cfg.dataset.name}-{digest}.pt"


def fit(
    cfg: DictConfig,
    tracker: Tracker,
    model: Distiller,
    datasets: tuple,
    plan: Plan,
    epochs: int,
    model_cfg: dict,
    seed: int,
) -> dict[str, Any]:
    """Build seeded loaders and a Trainer, train (or resume), and log the run's checkpoints."""
    seed_everything(seed + dist.rank())  # augmentations differ by rank; DDP starts every rank from rank 0's weights
    device = resolve_device(cfg.trainer.device)
    train_loader, val_loader = build_loaders(
        *datasets, cfg.trainer.batch_size, cfg.trainer.num_workers, seed,
        pin_memory=auto_flag(cfg.trainer.pin_memory, device), persistent_workers=cfg.trainer.persistent_workers,
    )
    run_info = {"run_uid": plan.run_uid, "fingerprint": plan.fingerprint, "config": plan.config, "mlflow_run_id": tracker.run_id}
    trainer = Trainer(
        model, train_loader, val_loader, cfg=cfg.trainer, epochs=epochs,
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
    result = trainer.fit()
    result["val_loader"] = val_loader
    result["device"] = device
    if cfg.logger.log_checkpoints:
        for name in ("best_checkpoint", "last_checkpoint"):
            tracker.log_artifact(result[name], "checkpoints")
    return result


def train_teacher(cfg: DictConfig, tracker: Tracker, datasets: tuple, plan: Plan, cache_dir: str | None) -> dict[str, Any]:
    """Train (or resume training) a teacher with cross-entropy only, as its own MLflow run."""
    seed_everything(cfg.teacher.seed)
    teacher = build(cfg.teacher.model)
    params = run_params(cfg) | {"params/teacher_m": count_params(teacher) / 1e6}
    name = f"teacher-{cfg.teacher.model.encoder_name}-{cfg.dataset.name}"
    with plan.active("teacher", cache_dir), tracker.run(name, params, tags_for(cfg, "teacher", None), plan.mlflow_run_id, plan.out_dir):
        log_skipped(cfg, tracker, datasets, plan)
        result = fit(
            cfg, tracker, Distiller(teacher), datasets, plan, cfg.trainer.teacher_epochs,
            model_config(cfg.teacher.model), cfg.teacher.seed,
        )
        if dist.is_main():
            log_speed(cfg, tracker, {"teacher": teacher}, result["device"])
    print(f"teacher val mIoU {100 * result['final_miou']:.2f} -> {result['last_checkpoint']}")
    return result


def get_teacher(cfg: DictConfig, datasets: tuple, teacher: nn.Module) -> tuple[dict, Path]:
    """Load the configured teacher checkpoint, or the cached one (trained once under a file lock),
    into ``teacher`` (a model of the configured architecture); returns the checkpoint and its path.

    A cached teacher whose training was interrupted is resumed (unless ``trainer.resume=off``).
    """
    expect = {key: cfg.teacher.model[key] for key in ("encoder_name", "output_stride")} | {"classes": cfg.dataset.num_classes}
    if cfg.teacher.checkpoint is not None:
        path = Path(cfg.teacher.checkpoint)
    elif cfg.dataset.name != "synthetic":
        raise ConfigError(
            f"teacher.checkpoint is null and dataset={cfg.dataset.name}: train a teacher first "
            "(python run.py task=teacher dataset=...) and pass teacher.checkpoint=PATH"
        )
    else:
        path = cached_teacher(cfg, datasets)
    ckpt = load_checkpoint(path)
    check_model(path, ckpt, expect)
    load_weights(path, teacher, ckpt)
    return ckpt, path


def cached_teacher(cfg: DictConfig, datasets: tuple) -> Path:
    """The built-in dataset's cached teacher checkpoint, trained first if it is missing."""
    path = teacher_cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with dist.main_first(), FileLock(f"{path}.lock"):  # other ranks wait for rank 0, then find the file
        if not path.exists():
            print(f"no cached teacher at {path}: training one ({cfg.trainer.teacher_epochs} epochs)", flush=True)
            t0 = time.perf_counter()
            with dist.single_process():  # rank 0 alone: the cached teacher does not depend on the world size
                mode = "off" if cfg.trainer.resume == "off" else "auto"
                plan = plan_run(mode, path.parent / f"{path.stem}-run", {"teacher_cache": path.name})
                result = train_teacher(cfg, Tracker.from_config(cfg), datasets, plan, None)
            result["last_checkpoint"].replace(path)
            print(f"teacher trained in {time.perf_counter() - t0:.0f}s and cached at {path}", flush=True)
    return path


def log_skipped(cfg: DictConfig, tracker: Tracker, datasets: tuple, plan: Plan) -> None:
    """With ``dataset.on_bad_sample=skip``: list the left-out samples in bad_samples.txt, log their count."""
    if cfg.dataset.on_bad_sample != "skip" or plan.resuming:
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


def distill(cfg: DictConfig, tracker: Tracker) -> float:
    """Train the student with CE + the active distillation terms against a frozen teacher."""
    terms = build_terms(cfg.loss.terms)
    label = term_label(terms)
    seed_everything(cfg.seed)
    student = build(cfg.student)
    teacher = build(cfg.teacher.model) if terms else None  # its weights are loaded below
    # taps exist, every term computes at the crop size, adapters are built: before any data or teacher work
    model = Distiller(
        student, teacher, terms, teacher_bn_mode=cfg.teacher.bn_mode, teacher_grad=cfg.teacher.grad,
        input_size=cfg.dataset.crop_size,
    )
    plan = plan_for(cfg)
    datasets = build_datasets(cfg.dataset)
    teacher_ckpt, teacher_path = get_teacher(cfg, datasets, teacher) if terms else (None, None)
    name = cfg.logger.run_name or f"distill-{cfg.student.encoder_name}-{label}-seed{cfg.seed}"
    params = run_params(cfg) | {"params/student_m": count_params(student) / 1e6, "loss.term_order": ",".join(cfg.loss.terms)}
    if teacher is not None:
        params["params/teacher_m"] = count_params(teacher) / 1e6
        params["teacher_checkpoint"] = str(teacher_path)
    tags = tags_for(cfg, "distill", cfg.student.encoder_name)
    out_dir = plan.out_dir
    with plan.active("distill", cfg.paths.cache_dir), tracker.run(name, params, tags, plan.mlflow_run_id, out_dir) as run_id:
        log_skipped(cfg, tracker, datasets, plan)
        teacher_miou = teacher_ckpt["metrics"]["miou"] if teacher_ckpt else None
        if teacher_miou is not None and not plan.resuming:
            tracker.log_metrics({"teacher/val_miou": teacher_miou}, 0)
        result = fit(cfg, tracker, model, datasets, plan, cfg.trainer.epochs, model_config(cfg.student), cfg.seed)
        if dist.is_main():
            finish(cfg, tracker, out_dir, result, student, teacher, label)
            log_speed(cfg, tracker, {"student": student, "teacher": teacher}, result["device"])
    print(f"\nstudent {cfg.student.encoder_name} ({label}) val mIoU: {100 * result['final_miou']:.2f} (best {100 * result['best_miou']:.2f})")
    if teacher_miou is not None:
        print(f"teacher {cfg.teacher.model.encoder_name} val mIoU: {100 * teacher_miou:.2f}")
    print(f"outputs: {out_dir}")
    if run_id:
        print(f"MLflow run {run_id} in {tracker.tracking_uri}\nbrowse: mlflow ui --backend-store-uri {tracker.tracking_uri}")
    return result["final_miou"]


def log_speed(cfg: DictConfig, tracker: Tracker, models: dict[str, nn.Module | None], device: torch.device) -> None:
    """Measure each model's real-time figures at ``dataset.eval_size`` and log them as ``speed/<name>_*``."""
    if not cfg.speed.enabled:
        return
    size = tuple(cfg.dataset.eval_size)
    for name, model in models.items():
        if model is not None:
            stats = model_stats(model, size, device, cfg.speed.repeats, cfg.speed.warmup)
            tracker.log_metrics({k: v for k, v in stats_metrics(stats, name).items() if k.startswith("speed/")}, 0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tracker.set_tags({"speed_device": f"{where}, batch 1 at {size[0]}x{size[1]}"})


def finish(
    cfg: DictConfig, tracker: Tracker, out_dir: Path, result: dict, student: nn.Module, teacher: nn.Module | None, label: str
) -> None:
    """Write and log the per-class IoU table, the prediction grid and the resolved config."""
    last = result["history"][-1]
    names, palette = dataset_classes(cfg.dataset.name)
    lines = ["| class | IoU (%) |", "|---|---|"]
    lines += [f"| {c} | {100 * last[f'val/iou/{c}']:.2f} |" for c in names if f"val/iou/{c}" in last]
    lines.append(f"| **mean** | **{100 * last['val/miou']:.2f}** |")
    (out_dir / "per_class_iou.md").write_text("\n".join(lines) + "\n")
    images, masks = next(iter(result["val_loader"]))
    images, masks = images[:4], masks[:4]
    device = result["device"]
    rows = [("ground truth", masks)]
    with torch.no_grad():
        if teacher is not None:
            rows.append((f"teacher {cfg.teacher.model.encoder_name}", teacher.eval()(images.to(device)).argmax(1).cpu()))
        student.eval()
        rows.append((f"student {cfg.student.encoder_name} ({label})", student(images.to(device)).argmax(1).cpu()))
    save_prediction_grid(out_dir / "predictions.png", images, rows, palette=palette)
    for name in ("per_class_iou.md", "predictions.png", "config.yaml"):
        tracker.log_artifact(out_dir / name)


def train_teacher_task(cfg: DictConfig, tracker: Tracker) -> float:
    """``task=teacher``: train a teacher (CE only) and write its checkpoint to the run folder."""
    plan = plan_for(cfg)
    result = train_teacher(cfg, tracker, build_datasets(cfg.dataset), plan, cfg.paths.cache_dir)
    print(f"use it with: python run.py teacher.checkpoint={result['last_checkpoint']}")
    return result["final_miou"]


def eval_task(cfg: DictConfig, tracker: Tracker) -> float:
    """``task=eval``: evaluate ``checkpoint`` (default: the cached teacher) on the val split."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    path = Path(cfg.checkpoint) if cfg.checkpoint else teacher_cache_path(cfg)
    model, _ = load_model(path, {"classes": cfg.dataset.num_classes})
    _, val_set = build_datasets(cfg.dataset)
    device = resolve_device(cfg.trainer.device)
    _, val_loader = build_loaders(val_set, val_set, 1, cfg.trainer.num_workers, cfg.seed)
    with tracker.run(f"eval-{path.stem}", run_params(cfg) | {"checkpoint": str(path)}, tags_for(cfg, "eval", None)):
        result = evaluate(model.to(device), val_loader, cfg.dataset.num_classes, device, progress=cfg.trainer.progress, eval_cfg=cfg.eval)
        tracker.log_metrics(epoch_metrics(result, dataset_classes(cfg.dataset.name).names), 0)
    print(f"{path}: val mIoU {100 * result['miou']:.2f}, pixel acc {100 * result['pixel_acc']:.2f} (eval {eval_settings(cfg.eval).describe()})")
    return result["miou"]
