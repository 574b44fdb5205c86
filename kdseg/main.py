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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdseg import dist
from kdseg.checkpoint import load_model, model_config
from kdseg.config import validate
from kdseg.data import build_datasets, build_loaders
from kdseg.data.classes import VOC_CLASSES
from kdseg.distill import Distiller
from kdseg.models import count_params, resolve_module
from kdseg.sweep import current_sweep
from kdseg.tracking import Tracker, git_commit, run_params
from kdseg.train import Trainer, evaluate, resolve_device, seed_everything
from kdseg.viz import save_prediction_grid

TEACHER_TRAIN_KEYS = ("teacher_epochs", "max_iters", "batch_size", "base_lr", "base_batch", "head_lr_mult", "optimizer", "scheduler", "amp")


def run(cfg: DictConfig) -> float:
    """Validate, then run ``cfg.task``; returns the final val mIoU."""
    validate(cfg)
    dist.setup(cfg)  # joins the process group under torchrun / a multi-task SLURM job; ranks > 0 go quiet
    out_dir = Path(cfg.paths.output_dir)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = Tracker.from_config(cfg)
    task = {"distill": distill, "teacher": train_teacher_task, "eval": eval_task}[cfg.task]
    return task(cfg, tracker, out_dir)


def active_terms(cfg: DictConfig) -> dict[str, nn.Module]:
    """The loss terms with a weight > 0, instantiated."""
    return {name: instantiate(term) for name, term in cfg.loss.terms.items() if term.weight > 0}


def tags_for(cfg: DictConfig, task: str, student: str | None) -> dict[str, str]:
    sweep_id, sweep_dir = current_sweep()
    return {
        "task": task,
        "student": student or "-",
        "teacher": cfg.teacher.model.encoder_name,
        "loss": cfg.loss.name if task == "distill" else "ce",
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
    out_dir: Path,
    epochs: int,
    model_cfg: dict,
    seed: int,
) -> dict[str, Any]:
    """Build seeded loaders and a Trainer, train, and log the run's checkpoints."""
    seed_everything(seed + dist.rank())  # augmentations differ by rank; DDP starts every rank from rank 0's weights
    device = resolve_device(cfg.trainer.device)
    train_loader, val_loader = build_loaders(
        *datasets, cfg.trainer.batch_size, cfg.trainer.num_workers, seed, pin_memory=device.type == "cuda"
    )
    trainer = Trainer(
        model, train_loader, val_loader, cfg=cfg.trainer, epochs=epochs,
        num_classes=cfg.dataset.num_classes, out_dir=out_dir, model_config=model_cfg,
        log=tracker.log_metrics, device=device,
    )
    result = trainer.fit()
    result["val_loader"] = val_loader
    result["device"] = device
    if cfg.logger.log_checkpoints:
        for name in ("best_checkpoint", "last_checkpoint"):
            tracker.log_artifact(result[name], "checkpoints")
    return result


def train_teacher(cfg: DictConfig, tracker: Tracker, datasets: tuple, out_dir: Path) -> dict[str, Any]:
    """Train a teacher with cross-entropy only, as its own MLflow run."""
    seed_everything(cfg.teacher.seed)
    teacher = instantiate(cfg.teacher.model)
    params = run_params(cfg) | {"params/teacher_m": count_params(teacher) / 1e6}
    with tracker.run(f"teacher-{cfg.teacher.model.encoder_name}-{cfg.dataset.name}", params, tags_for(cfg, "teacher", None)):
        result = fit(
            cfg, tracker, Distiller(teacher), datasets, out_dir, cfg.trainer.teacher_epochs,
            model_config(cfg.teacher.model), cfg.teacher.seed,
        )
    print(f"teacher val mIoU {100 * result['final_miou']:.2f} -> {result['last_checkpoint']}")
    return result


def get_teacher(cfg: DictConfig, datasets: tuple) -> tuple[nn.Module, dict, Path]:
    """The configured teacher checkpoint, or the cached one (trained once under a file lock)."""
    expect = {"classes": cfg.dataset.num_classes}
    if cfg.teacher.checkpoint is not None:
        return load_model(cfg.teacher.checkpoint, expect) + (Path(cfg.teacher.checkpoint),)
    if cfg.dataset.name != "synthetic":
        raise ValueError(
            f"teacher.checkpoint is null and dataset={cfg.dataset.name}: train a teacher first "
            "(python run.py task=teacher dataset=...) and pass teacher.checkpoint=PATH"
        )
    path = teacher_cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with dist.main_first(), FileLock(f"{path}.lock"):  # other ranks wait for rank 0, then find the file
        if not path.exists():
            print(f"no cached teacher at {path}: training one ({cfg.trainer.teacher_epochs} epochs)", flush=True)
            t0 = time.perf_counter()
            with dist.single_process():  # rank 0 alone: the cached teacher does not depend on the world size
                result = train_teacher(cfg, Tracker.from_config(cfg), datasets, path.parent / f"{path.stem}-run")
            result["last_checkpoint"].replace(path)
            print(f"teacher trained in {time.perf_counter() - t0:.0f}s and cached at {path}", flush=True)
    return load_model(path, expect) + (path,)


def check_taps(model: nn.Module, terms: dict[str, nn.Module], role: str) -> None:
    """Every tap path exists in ``model`` (clear error with close matches otherwise)."""
    for term in terms.values():
        try:
            resolve_module(model, term.tap)
        except ValueError as err:
            raise ValueError(f"{role}: {err}") from None


def distill(cfg: DictConfig, tracker: Tracker, out_dir: Path) -> float:
    """Train the student with CE + the active distillation terms against a frozen teacher."""
    terms = active_terms(cfg)
    seed_everything(cfg.seed)
    student = instantiate(cfg.student)
    check_taps(student, terms, "student")
    if terms:
        check_taps(instantiate(cfg.teacher.model), terms, "teacher")
    datasets = build_datasets(cfg.dataset)
    teacher, teacher_ckpt, teacher_path = get_teacher(cfg, datasets) if terms else (None, None, None)
    model = Distiller(student, teacher, terms, teacher_bn_mode=cfg.teacher.bn_mode)
    name = cfg.logger.run_name or f"distill-{cfg.student.encoder_name}-{cfg.loss.name}-seed{cfg.seed}"
    params = run_params(cfg) | {"params/student_m": count_params(student) / 1e6}
    if teacher is not None:
        params["params/teacher_m"] = count_params(teacher) / 1e6
        params["teacher_checkpoint"] = str(teacher_path)
    with tracker.run(name, params, tags_for(cfg, "distill", cfg.student.encoder_name)) as run_id:
        result = fit(cfg, tracker, model, datasets, out_dir, cfg.trainer.epochs, model_config(cfg.student), cfg.seed)
        teacher_miou = teacher_ckpt["metrics"]["miou"] if teacher_ckpt else None
        if teacher_miou is not None:
            tracker.log_metrics({"teacher/val_miou": teacher_miou}, 0)
        if dist.is_main():
            finish(cfg, tracker, out_dir, result, student, teacher)
    print(f"\nstudent {cfg.student.encoder_name} ({cfg.loss.name}) val mIoU: {100 * result['final_miou']:.2f} (best {100 * result['best_miou']:.2f})")
    if teacher_miou is not None:
        print(f"teacher {cfg.teacher.model.encoder_name} val mIoU: {100 * teacher_miou:.2f}")
    print(f"outputs: {out_dir}")
    if run_id:
        print(f"MLflow run {run_id} in {tracker.tracking_uri}\nbrowse: mlflow ui --backend-store-uri {tracker.tracking_uri}")
    return result["final_miou"]


def finish(cfg: DictConfig, tracker: Tracker, out_dir: Path, result: dict, student: nn.Module, teacher: nn.Module | None) -> None:
    """Write and log the per-class IoU table, the prediction grid and the resolved config."""
    last = result["history"][-1]
    lines = ["| class | IoU (%) |", "|---|---|"]
    lines += [f"| {c} | {100 * last[f'val/iou/{c}']:.2f} |" for c in VOC_CLASSES if f"val/iou/{c}" in last]
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
        rows.append((f"student {cfg.student.encoder_name} ({cfg.loss.name})", student(images.to(device)).argmax(1).cpu()))
    save_prediction_grid(out_dir / "predictions.png", images, rows)
    for name in ("per_class_iou.md", "predictions.png", "config.yaml"):
        tracker.log_artifact(out_dir / name)


def train_teacher_task(cfg: DictConfig, tracker: Tracker, out_dir: Path) -> float:
    """``task=teacher``: train a teacher (CE only) and write its checkpoint to the run folder."""
    result = train_teacher(cfg, tracker, build_datasets(cfg.dataset), out_dir)
    print(f"use it with: python run.py teacher.checkpoint={result['last_checkpoint']}")
    return result["final_miou"]


def eval_task(cfg: DictConfig, tracker: Tracker, out_dir: Path) -> float:
    """``task=eval``: evaluate ``checkpoint`` (default: the cached teacher) on the val split."""
    path = Path(cfg.checkpoint) if cfg.checkpoint else teacher_cache_path(cfg)
    model, _ = load_model(path, {"classes": cfg.dataset.num_classes})
    _, val_set = build_datasets(cfg.dataset)
    device = resolve_device(cfg.trainer.device)
    _, val_loader = build_loaders(val_set, val_set, 1, cfg.trainer.num_workers, cfg.seed)
    with tracker.run(f"eval-{path.stem}", run_params(cfg) | {"checkpoint": str(path)}, tags_for(cfg, "eval", None)):
        result = evaluate(model.to(device), val_loader, cfg.dataset.num_classes, device, progress=cfg.trainer.progress)
        tracker.log_metrics({"val/miou": result["miou"], "val/pixel_acc": result["pixel_acc"]}, 0)
    print(f"{path}: val mIoU {100 * result['miou']:.2f}, pixel acc {100 * result['pixel_acc']:.2f}")
    return result["miou"]
