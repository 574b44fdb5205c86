"""``task=teacher``: train a teacher (cross-entropy only) and write its checkpoint to the run folder."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from kdseg.data import build_datasets
from kdseg.job import plan_for
from kdseg.resume import run_config
from kdseg.teacher import teacher_config, train_teacher
from kdseg.tracking import Tracker


def run_teacher(cfg: DictConfig, tracker: Tracker, device: torch.device) -> float:
    """Train a teacher with ``teacher.train``'s settings; print how to distil from it; return its final val mIoU."""
    plan = plan_for(cfg, run_config(teacher_config(cfg, cfg.paths.output_dir)))
    result = train_teacher(cfg, tracker, build_datasets(cfg.dataset), plan, device, cfg.paths.cache_dir)
    print(f"use it with: python run.py teacher.checkpoint={result.last_checkpoint}")
    return result.final_miou
