"""``task=distill`` (the default): train the student with cross-entropy + the active distillation terms."""
from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kdseg import dist
from kdseg.checkpoint import model_config
from kdseg.data import build_datasets
from kdseg.data.classes import dataset_classes
from kdseg.distill import Distiller, build_terms, term_label
from kdseg.job import FitResult, build, fit_steps, log_skipped, log_speed, plan_for, tags_for
from kdseg.models import count_params, load_pretrained, model_name
from kdseg.profile import check_input_size
from kdseg.runtime import seed_everything
from kdseg.teacher import get_teacher
from kdseg.tracking import Tracker, run_params
from kdseg.utils import drain
from kdseg.viz import save_prediction_grid

GRID_IMAGES = 4
"""Val images in a run's predictions.png (at most: the first val batch's)."""


def run_distill(cfg: DictConfig, tracker: Tracker, device: torch.device) -> float:
    """Train the student against a frozen teacher; returns its final val mIoU."""
    return drain(distill(cfg, tracker, device))


def build_networks(cfg: DictConfig) -> tuple[dict, nn.Module, nn.Module | None]:
    """The run's active terms, its student and (when a term needs one) its teacher, built right
    after seeding: the student's initial weights depend on nothing else."""
    terms = build_terms(cfg.loss.terms)
    seed_everything(cfg.seed)
    student = build(cfg.student)
    pretrained = cfg.teacher.get("pretrained")
    if terms and pretrained is not None:  # a model saved by smp, weights included
        teacher = load_pretrained(pretrained, cfg.dataset.num_classes)
        check_input_size(teacher, (cfg.dataset.crop_size, cfg.dataset.crop_size))
    else:
        teacher = build(cfg.teacher.model) if terms else None  # its weights are loaded by get_teacher
    return terms, student, teacher


def distill(cfg: DictConfig, tracker: Tracker, device: torch.device, group: Any = None) -> Generator[Any, None, float]:
    """:func:`run_distill`, paused before training and after every step (:meth:`kdseg.train.Trainer.steps`).

    ``group`` (a :class:`kdseg.fused.Group`) is what the members of a fused sweep share: the
    datasets, the loaded teacher and its checkpoint, the loaders and one teacher pass per batch.
    The student and the terms' learned parts are built exactly as a run of its own builds them
    (the teacher built here only keeps the random stream where a lone run leaves it).
    """
    terms, student, teacher = build_networks(cfg)
    label = term_label(terms)
    if group is not None and terms:
        teacher = group.teacher
    # taps exist, every term computes at the crop size, adapters are built: before any data or teacher work
    model = Distiller(
        student, teacher, terms, teacher_bn_mode=cfg.teacher.bn_mode, teacher_grad=cfg.teacher.grad,
        input_size=cfg.dataset.crop_size,
    )
    plan = plan_for(cfg)
    pretrained = cfg.teacher.get("pretrained")
    if group is not None:
        datasets, (teacher_ckpt, teacher_path) = group.datasets, group.teacher_checkpoint if terms else (None, None)
        if terms:
            model.teacher_pass = group.teacher_pass
    else:
        datasets = build_datasets(cfg.dataset)
        teacher_ckpt, teacher_path = get_teacher(cfg, datasets, teacher, device) if terms and pretrained is None else (None, pretrained)
    name = cfg.logger.run_name or f"distill-{model_name(cfg.student)}-{label}-seed{cfg.seed}"
    params = run_params(cfg, dist.world_size()) | {"params/student_m": count_params(student) / 1e6, "loss.term_order": ",".join(cfg.loss.terms)}
    if teacher is not None:
        params["params/teacher_m"] = count_params(teacher) / 1e6
        params["teacher_checkpoint"] = str(teacher_path)
    tags = tags_for(plan.config)
    out_dir = plan.out_dir
    with plan.active("distill", cfg.paths.cache_dir), tracker.run(name, params, tags, plan.mlflow_run_id, out_dir) as run_id:
        log_skipped(cfg, tracker, datasets, plan)
        teacher_miou = teacher_ckpt["metrics"]["miou"] if teacher_ckpt else None
        if teacher_miou is not None and not plan.resuming:
            tracker.log_metrics({"teacher/val_miou": teacher_miou}, 0)
        result = yield from fit_steps(
            cfg, tracker, model, datasets, plan, device,
            trainer_cfg=cfg.trainer, epochs=cfg.trainer.epochs, model_cfg=model_config(cfg.student), seed=cfg.seed,
            loaders=group.loaders if group is not None else None,
        )
        if dist.is_main():
            write_artifacts(cfg, tracker, out_dir, result, student, teacher, label, device)
            log_speed(cfg, tracker, {"student": student, "teacher": teacher}, device)
    print(f"\nstudent {model_name(cfg.student)} ({label}) val mIoU: {100 * result.final_miou:.2f} (best {100 * result.best_miou:.2f})")
    if teacher_miou is not None:
        print(f"teacher {model_name(cfg.teacher.model)} val mIoU: {100 * teacher_miou:.2f}")
    print(f"outputs: {out_dir}")
    if run_id:
        print(f"MLflow run {run_id} in {tracker.tracking_uri}\nbrowse: mlflow ui --backend-store-uri {tracker.tracking_uri}")
    return result.final_miou


def write_artifacts(
    cfg: DictConfig, tracker: Tracker, out_dir: Path, result: FitResult, student: nn.Module, teacher: nn.Module | None,
    label: str, device: torch.device,
) -> None:
    """Write and log the per-class IoU table, the prediction grid and the resolved config."""
    last = result.history[-1]
    names, palette = dataset_classes(cfg.dataset.name)
    lines = ["| class | IoU (%) |", "|---|---|"]
    lines += [f"| {c} | {100 * last[f'val/iou/{c}']:.2f} |" for c in names if f"val/iou/{c}" in last]
    lines.append(f"| **mean** | **{100 * last['val/miou']:.2f}** |")
    (out_dir / "per_class_iou.md").write_text("\n".join(lines) + "\n")
    images, masks = next(iter(result.val_loader))
    images, masks = images[:GRID_IMAGES], masks[:GRID_IMAGES]
    rows = [("ground truth", masks)]
    with torch.no_grad():
        if teacher is not None:
            rows.append((f"teacher {model_name(cfg.teacher.model)}", teacher.eval()(images.to(device)).argmax(1).cpu()))
        student.eval()
        rows.append((f"student {model_name(cfg.student)} ({label})", student(images.to(device)).argmax(1).cpu()))
    save_prediction_grid(out_dir / "predictions.png", images, rows, palette=palette)
    for name in ("per_class_iou.md", "predictions.png", "config.yaml"):
        tracker.log_artifact(out_dir / name)
