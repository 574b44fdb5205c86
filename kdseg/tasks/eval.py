"""``task=eval``: evaluate ``checkpoint`` (default: the cached teacher) on the val split.

The eval run records the evaluated model, not the eval command: its tags (student, teacher,
loss, seed ...) and params come from the training config the checkpoint stores, the eval's own
settings are params under ``evaluation.``, and ``trained_in_run`` links it to the training run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kdseg import dist
from kdseg.checkpoint import load_model
from kdseg.data import build_datasets, build_loaders
from kdseg.data.classes import dataset_classes
from kdseg.inference import eval_settings
from kdseg.job import model_tags, tags_for, write_config
from kdseg.models import INPUT_MULTIPLE, input_multiple, model_name
from kdseg.teacher import cache_path
from kdseg.tracking import Tracker
from kdseg.tracking.fields import select_params
from kdseg.train import epoch_metrics, evaluate
from kdseg.utils import flatten

EVAL_PREFIX = "evaluation."
"""Prefix of the eval run's own settings among its params (the checkpoint's training config keeps its keys)."""


def trained_config(ckpt: dict, cached_teacher: bool) -> dict[str, Any]:
    """The flattened training config a checkpoint stores, completed with what its model config says.

    A checkpoint without one (written by an older kdseg, or by hand) still names its model; the
    cached teacher's older checkpoints store only ``teacher_cache``, which says it is a teacher.
    """
    config = dict(ckpt.get("config") or {})
    if "task" not in config:
        role = "teacher" if cached_teacher or "teacher_cache" in config else None
        if role is not None:
            config |= {"task": "teacher"} | {f"teacher.model.{key}": ckpt["model"][key] for key in ("arch", "encoder_name") if key in ckpt["model"]}
    return config


def eval_record(cfg: DictConfig, path: Path, ckpt: dict, tracker: Tracker) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The eval run's name, params and tags: the evaluated model's, with the eval's settings and the training run's link."""
    config = trained_config(ckpt, not cfg.checkpoint)
    tags = tags_for(config) | {"task": "eval", "trained_task": str(config.get("task", "-")),
                               "model": model_name(ckpt["model"]), "dataset": cfg.dataset.name}
    described = model_tags(config)
    if described["task"] == "distill":
        what = f"{described['student']}-{described['loss']}-seed{described['seed']}"
    elif described["task"] == "teacher":
        what = f"teacher-{described['teacher']}-seed{described['seed']}"
    else:
        what = model_name(ckpt["model"])
    own = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("eval", "dataset")} | {"device": cfg.trainer.device}
    params = select_params(config) | {f"{EVAL_PREFIX}{key}": value for key, value in flatten(own).items()}
    params |= {"checkpoint": str(path), "dist.world_size": dist.world_size()}
    training_run = ckpt.get("mlflow_run_id")
    if training_run:
        tags["trained_in_run"] = training_run
        found = tracker.find_run(training_run)
        if found is not None:
            tags["trained_in_run_name"] = found.info.run_name
            tags["mlflow.note.content"] = (
                f"Evaluation of `{path}`, trained in run [{found.info.run_name}]"
                f"(#/experiments/{found.info.experiment_id}/runs/{training_run})."
            )
    return cfg.logger.run_name or f"eval-{what}-{path.stem}", params, tags


def run_eval(cfg: DictConfig, tracker: Tracker, device: torch.device) -> float:
    """Evaluate a checkpoint as ``eval`` says, log the metrics as their own run; return the val mIoU."""
    write_config(cfg, Path(cfg.paths.output_dir))
    path = (Path(cfg.checkpoint) if cfg.checkpoint else cache_path(cfg)).resolve()
    model, ckpt = load_model(path, {"classes": cfg.dataset.num_classes})
    _, val_set = build_datasets(cfg.dataset)
    _, val_loader = build_loaders(val_set, val_set, 1, cfg.trainer.num_workers, cfg.seed,
                                  stride=math.lcm(INPUT_MULTIPLE, input_multiple(model)))
    settings = eval_settings(cfg.eval)
    with tracker.run(*eval_record(cfg, path, ckpt, tracker)):
        result = evaluate(model.to(device), val_loader, cfg.dataset.num_classes, device, progress=cfg.trainer.progress, eval_cfg=settings)
        tracker.log_metrics(epoch_metrics(result, dataset_classes(cfg.dataset.name).names), 0)
    print(f"{path}: val mIoU {100 * result['miou']:.2f}, pixel acc {100 * result['pixel_acc']:.2f} (eval {settings.describe()})")
    return result["miou"]
