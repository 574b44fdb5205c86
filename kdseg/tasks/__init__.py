"""The three tasks behind ``run.py``: ``distill`` (default), ``teacher`` and ``eval``.

:func:`run` is what ``run.py`` calls: validate the config, set up the process once (device,
backend switches, the DDP process group), reach the tracking store, then run ``cfg.task``.
Each task returns the final val mIoU (a fraction) so Hydra sweepers can optimise it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig

from kdseg import dist
from kdseg.config import validate
from kdseg.runtime import configure_backends, resolve_device
from kdseg.schema import Task
from kdseg.tasks.distill import run_distill
from kdseg.tasks.eval import run_eval
from kdseg.tasks.teacher import run_teacher
from kdseg.tracking import Tracker

TASKS: dict[Task, Callable[[DictConfig, Tracker, torch.device], float]] = {
    Task.distill: run_distill,
    Task.teacher: run_teacher,
    Task.eval: run_eval,
}


def run(cfg: DictConfig) -> float:
    """Validate, set up the process, reach the tracking store, then run ``cfg.task``; returns the final val mIoU."""
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    configure_backends(cfg.trainer, device)  # process-wide (threads, cuDNN): once, here
    dist.setup(cfg, device)  # joins the process group under torchrun / a multi-task SLURM job; ranks > 0 go quiet
    tracker = Tracker.from_config(cfg.logger, enabled=dist.is_main())  # rank 0 logs for all
    return TASKS[Task(cfg.task)](cfg, tracker, device)
