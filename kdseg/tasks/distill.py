"""``task=distill`` (the default): train the student with cross-entropy + the active distillation terms."""
from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdseg import dist
from kdseg.checkpoint import model_config
from kdseg.data import build_datasets
from kdseg.data.classes import dataset_classes
from kdseg.distill import Distiller, build_terms, term_label
from kdseg.job import FitResult, build, fit_steps, log_skipped, log_speed, plan_for, tags_for
from kdseg.models import count_params, load_pretrained, model_name
from kdseg.profile import check_input_size
from kdseg.runtime import rng_digest, rng_state, seed_everything, set_rng_state
from kdseg.sweep import swept_keys
from kdseg.teacher import get_teacher
from kdseg.tracking import Tracker, run_params
from kdseg.tracking.fields import DESCRIPTION_TAG, dataset_inputs, describe, in_multirun, job_overrides
from kdseg.utils import digest, drain
from kdseg.viz import save_prediction_grid

RNG_DIGEST_CHARS = 16
"""Hex digits naming a point of the random streams (with a teacher config) in a group's ``teacher_draws``."""
GRID_IMAGES = 4
"""Val images in a run's predictions.png (at most: the first val batch's)."""


def run_distill(cfg: DictConfig, tracker: Tracker, device: torch.device) -> float:
    """Train the student against a frozen teacher; returns its final val mIoU."""
    return drain(distill(cfg, tracker, device))


def build_networks(cfg: DictConfig, teacher_draws: dict[str, dict] | None = None) -> tuple[dict, nn.Module, nn.Module | None]:
    """The run's active terms, its student and (when a term needs one) its teacher, built right
    after seeding: the student's initial weights depend on nothing else.

    ``teacher_draws`` (a fused group's, whose members share one teacher): building the teacher
    only moves the random streams on, so the streams it leaves are remembered by the streams and
    teacher config it started from; a member that starts from a remembered point takes the
    remembered result instead of building the teacher again, and gets None for a teacher.
    """
    terms = build_terms(cfg.loss.terms)
    seed_everything(cfg.seed)
    student = build(cfg.student)
    if not terms:
        return terms, student, None
    key = None
    if teacher_draws is not None:
        key = digest({"teacher": OmegaConf.to_container(cfg.teacher, resolve=True), "rng": rng_digest()}, RNG_DIGEST_CHARS)
        if key in teacher_draws:
            set_rng_state(teacher_draws[key])
            return terms, student, None
    pretrained = cfg.teacher.get("pretrained")
    if pretrained is not None:  # a model saved by smp, weights included
        teacher = load_pretrained(pretrained, cfg.dataset.num_classes)
        check_input_size(teacher, (cfg.dataset.crop_size, cfg.dataset.crop_size))
    else:
        teacher = build(cfg.teacher.model)  # its weights are loaded by get_teacher
    if key is not None:
        teacher_draws[key] = rng_state()
    return terms, student, teacher


def distill(cfg: DictConfig, tracker: Tracker, device: torch.device, group: Any = None) -> Generator[Any, None, float]:
    """:func:`run_distill`, paused before training and after every step (:meth:`kdseg.train.Trainer.steps`).

    ``group`` (a :class:`kdseg.fused.Group`) is what the members of a fused sweep share: the
    datasets, the loaded teacher and its checkpoint, the loaders and one teacher pass per batch.
    The student and the terms' learned parts are built exactly as a run of its own builds them
    (the teacher is built, or its draws replayed, only to leave the random streams where a lone run leaves them).
    """
    terms, student, teacher = build_networks(cfg, group.teacher_draws if group is not None else None)
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
    overrides = job_overrides() if in_multirun() else None  # now: a fused group's Hydra config is this job's only while it is set up
    name = cfg.logger.run_name or run_name(model_name(cfg.student), label, cfg.seed, overrides or [])
    params = run_params(cfg, dist.world_size()) | {"params/student_m": count_params(student) / 1e6, "loss.term_order": ",".join(cfg.loss.terms)}
    if teacher is not None:
        params["params/teacher_m"] = count_params(teacher) / 1e6
        params["teacher_checkpoint"] = str(teacher_path)
    out_dir = plan.out_dir
    teacher_name = model_name(cfg.teacher.model) if terms else None
    weights = {term: float(cfg.loss.terms[term].weight) for term in terms}
    what = dict(what="distill", model=model_name(cfg.student), teacher=teacher_name, terms=weights, dataset=cfg.dataset.name,
                seed=cfg.seed, run_dir=out_dir, overrides=overrides)
    tags = tags_for(plan.config, run_dir=out_dir) | {DESCRIPTION_TAG: describe(**what)}
    with plan.active("distill", cfg.paths.cache_dir), tracker.run(name, params, tags, plan.mlflow_run_id, out_dir) as run_id:
        if not plan.resuming:
            tracker.log_inputs(dataset_inputs(cfg.dataset, datasets))
        log_skipped(cfg, tracker, datasets, plan)
        teacher_miou = teacher_ckpt["metrics"]["miou"] if teacher_ckpt else None
        if teacher_miou is not None and not plan.resuming:
            tracker.log_metrics({"teacher/val_miou": teacher_miou}, 0)
        result = yield from fit_steps(
            cfg, tracker, model, datasets, plan, device,
            trainer_cfg=cfg.trainer, epochs=cfg.trainer.epochs, model_cfg=model_config(cfg.student), seed=cfg.seed,
            loaders=group.loaders if group is not None else None, log_model=cfg.logger.log_model,
        )
        if dist.is_main():
            write_artifacts(cfg, tracker, out_dir, result, student, teacher, label, device)
            log_speed(cfg, tracker, {"student": student, "teacher": teacher}, device)
            tracker.describe(describe(**what, result={"final_miou": result.final_miou, "best_miou": result.best_miou}))
    print(f"\nstudent {model_name(cfg.student)} ({label}) val mIoU: {100 * result.final_miou:.2f} (best {100 * result.best_miou:.2f})")
    if teacher_miou is not None:
        print(f"teacher {model_name(cfg.teacher.model)} val mIoU: {100 * teacher_miou:.2f}")
    print(f"outputs: {out_dir}")
    if run_id:
        print(tracker.ui_hint())
    return result.final_miou


def run_name(student: str, label: str, seed: int, overrides: Sequence[str]) -> str:
    """A distill run's default name: ``resnet18 pi+pa seed0``; in a multirun that sweeps other keys too
    (a learning rate, a term's option), their values come before the seed (``resnet18 kd base_lr=0.01 seed0``),
    so that the names of a sweep's runs differ."""
    skip = {"seed", "loss", "student"}
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    extra = [f"{key.removeprefix('loss.terms.').removeprefix('trainer.').removeprefix('+')}={given[key]}"
             for key in swept_keys() if key not in skip and key in given]
    return " ".join([student, label, *extra, f"seed{seed}"])


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
