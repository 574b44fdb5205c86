"""The teacher: trained as its own job (``teacher.train``), cached for generated datasets, loaded for distillation.

On a generated dataset (the built-in one) a missing teacher is trained once and cached under
``<paths.cache_dir>/teachers/``; a file lock keeps parallel jobs (sweeps, DDP ranks) from
training it twice. The cache key is everything that decides which teacher comes out: the
dataset (what data), ``teacher.model`` (which network) and ``teacher.train`` (how it is trained:
its epochs and seed, and the optimisation settings it shares with the student's training).
On real data the user trains one with ``task=teacher`` and passes ``teacher.checkpoint``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdseg import dist
from kdseg.checkpoint import MODEL_DEFAULTS, check_model, load_checkpoint, load_weights, model_config
from kdseg.distill import Distiller
from kdseg.errors import ConfigError
from kdseg.job import FitResult, build, fit_steps, log_skipped, log_speed, tags_for, write_config
from kdseg.models import count_params, model_name
from kdseg.resume import Plan, plan_run, run_config
from kdseg.runtime import seed_everything
from kdseg.tracking import Tracker, run_params
from kdseg.tracking.fields import DESCRIPTION_TAG, dataset_inputs, describe
from kdseg.utils import digest, drain

CACHE_KEY_CHARS = 12
"""Hex digits of a cached teacher's key in its file name (48 bits: the teachers one cache holds do not collide)."""
NOT_DATA_KEYS = ("on_bad_sample", "tune_fraction", "tune_seed")
"""Dataset keys that do not change which data a teacher learns from: how bad files are handled,
and a tuning run's held-out part (a teacher always trains on the whole train split)."""


def cache_key(cfg: DictConfig) -> dict:
    """What decides the teacher ``cfg`` would train: the dataset, ``teacher.model`` and ``teacher.train``, resolved.

    A generated dataset's root is left out: its files are a function of its other settings.
    """
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key in NOT_DATA_KEYS + (("root",) if cfg.dataset.generated else ()):
        dataset.pop(key)
    model = OmegaConf.to_container(cfg.teacher.model, resolve=True)
    for key, default in MODEL_DEFAULTS.items():  # a DeepLabV3+ keeps the key (and cache) it had before `arch`
        if model.get(key) == default:
            model.pop(key)
    return {
        "dataset": dataset,
        "model": model,
        "train": OmegaConf.to_container(cfg.teacher.train, resolve=True),
    }


def cache_path(cfg: DictConfig) -> Path:
    """Cache file of the teacher that ``cfg`` would train (:func:`cache_key`)."""
    name = f"{model_name(cfg.teacher.model)}-{cfg.dataset.name}-{digest(cache_key(cfg), CACHE_KEY_CHARS)}.pt"
    return Path(cfg.paths.cache_dir) / "teachers" / name


def trainer_config(cfg: DictConfig) -> DictConfig:
    """The ``trainer`` config a teacher trains with: the student's, with ``teacher.train``'s settings
    (its epochs and the shared ones it may set itself) in place."""
    shared = {key: value for key, value in cfg.teacher.train.items() if key in cfg.trainer}
    return OmegaConf.merge(cfg.trainer, shared)


def teacher_config(cfg: DictConfig, out_dir: str | Path) -> DictConfig:
    """The config a teacher trains with, resolved, as its run and checkpoints record it.

    Not the job's config (which may be a student's distillation job that needed the cached
    teacher): ``task=teacher``, ``seed`` = ``teacher.train.seed``, ``teacher.model`` and
    ``teacher.train``, the dataset, the trainer settings it trains with (:func:`trainer_config`),
    eval, speed, and paths with ``output_dir`` = the teacher's own run folder ``out_dir``.
    """
    node = {
        "task": "teacher",
        "seed": cfg.teacher.train.seed,
        "teacher": {key: OmegaConf.to_container(cfg.teacher[key], resolve=True) for key in ("model", "train")},
        "trainer": OmegaConf.to_container(trainer_config(cfg), resolve=True),
    } | {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("dataset", "eval", "speed", "paths")}
    node["paths"]["output_dir"] = str(Path(out_dir).resolve())
    return OmegaConf.create(node)


def train_teacher(
    cfg: DictConfig, tracker: Tracker, datasets: tuple, plan: Plan, device: torch.device, cache_dir: str | None,
    cache: Path | None = None,
) -> FitResult:
    """Train (or resume training) a teacher with cross-entropy only, as its own MLflow run.

    The run and its checkpoints record :func:`teacher_config`. ``cache``: the cache file this
    teacher is trained for (its name and key are recorded; the run belongs to no one sweep).
    """
    train = cfg.teacher.train
    seed_everything(train.seed)
    teacher = build(cfg.teacher.model)
    own = teacher_config(cfg, plan.out_dir)
    record = run_config(own) | ({"teacher_cache": cache.name} if cache else {})
    params = run_params(own, dist.world_size()) | {"params/teacher_m": count_params(teacher) / 1e6}
    tags = tags_for(record, shared=cache is not None, run_dir=plan.out_dir)
    what = dict(what="teacher", model=model_name(cfg.teacher.model), terms={}, dataset=cfg.dataset.name, seed=train.seed, run_dir=plan.out_dir)
    tags[DESCRIPTION_TAG] = describe(**what)
    if cache is not None:
        params["teacher_cache"] = cache.name
        tags |= {"teacher_cache": cache.name, "teacher_cache_key": digest(cache_key(cfg), CACHE_KEY_CHARS)}
        write_config(own, plan.out_dir)  # the teacher's folder holds the teacher's config, not the job's
    name = f"teacher-{model_name(cfg.teacher.model)}-{cfg.dataset.name}"
    with plan.active("teacher", cache_dir), tracker.run(name, params, tags, plan.mlflow_run_id, plan.out_dir):
        if not plan.resuming:
            tracker.log_inputs(dataset_inputs(cfg.dataset, datasets))
        log_skipped(cfg, tracker, datasets, plan)
        result = drain(fit_steps(
            cfg, tracker, Distiller(teacher), datasets, plan, device,
            trainer_cfg=trainer_config(cfg), epochs=train.epochs, model_cfg=model_config(cfg.teacher.model), seed=train.seed,
            record=record,
        ))
        if dist.is_main():
            log_speed(cfg, tracker, {"teacher": teacher}, device)
            tracker.describe(describe(**what, result={"final_miou": result.final_miou, "best_miou": result.best_miou}))
    print(f"teacher val mIoU {100 * result.final_miou:.2f} -> {result.last_checkpoint}")
    return result


def cached_teacher(cfg: DictConfig, datasets: tuple, device: torch.device) -> Path:
    """The generated dataset's cached teacher checkpoint, trained first if it is missing.

    A cached teacher whose training was interrupted is resumed (unless ``trainer.resume=off``).
    """
    path = cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with dist.main_first(), FileLock(f"{path}.lock"):  # other ranks wait for rank 0, then find the file
        if not path.exists() and cfg.dataset.get("tune_fraction") is not None:
            raise ConfigError(
                f"dataset.tune_fraction={cfg.dataset.tune_fraction} (a tuning run) needs its teacher trained first, "
                f"and there is none at {path}: a teacher trains on the whole train split and is scored on val, which a "
                "tuning run never reads. Run the same command without dataset.tune_fraction once (python -m kdseg.study does)"
            )
        if not path.exists():
            print(f"no cached teacher at {path}: training one ({cfg.teacher.train.epochs} epochs)", flush=True)
            t0 = time.perf_counter()
            with dist.single_process():  # rank 0 alone: the cached teacher does not depend on the world size
                mode = "off" if cfg.trainer.resume == "off" else "auto"
                plan = plan_run(mode, path.parent / f"{path.stem}-run", {"teacher_cache": path.name})
                result = train_teacher(cfg, Tracker.from_config(cfg.logger), datasets, plan, device, None, cache=path)
            result.last_checkpoint.replace(path)
            print(f"teacher trained in {time.perf_counter() - t0:.0f}s and cached at {path}", flush=True)
    return path


def get_teacher(cfg: DictConfig, datasets: tuple, teacher: nn.Module, device: torch.device) -> tuple[dict, Path]:
    """Load the configured teacher checkpoint, or on a generated dataset the cached one (trained
    first if missing), into ``teacher`` (a model of the configured architecture); returns the
    checkpoint and its path."""
    expect = {key: cfg.teacher.model[key] for key in ("arch", "encoder_name", "output_stride")} | {"classes": cfg.dataset.num_classes}
    if cfg.teacher.checkpoint is not None:
        path = Path(cfg.teacher.checkpoint)
    elif not cfg.dataset.generated:
        raise ConfigError(
            f"teacher.checkpoint is null and dataset={cfg.dataset.name}: train a teacher first "
            "(python run.py task=teacher dataset=...) and pass teacher.checkpoint=PATH"
        )
    else:
        path = cached_teacher(cfg, datasets, device)
    ckpt = load_checkpoint(path)
    check_model(path, ckpt, expect)
    load_weights(path, teacher, ckpt)
    return ckpt, path
