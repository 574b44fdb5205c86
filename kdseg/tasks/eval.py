"""``task=eval``: evaluate ``checkpoint`` (default: the cached teacher) on the val split."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from kdseg import dist
from kdseg.checkpoint import load_model
from kdseg.data import build_datasets, build_loaders
from kdseg.data.classes import dataset_classes
from kdseg.inference import eval_settings
from kdseg.job import tags_for, write_config
from kdseg.models import INPUT_MULTIPLE, input_multiple
from kdseg.teacher import cache_path
from kdseg.tracking import Tracker, run_params
from kdseg.train import epoch_metrics, evaluate


def run_eval(cfg: DictConfig, tracker: Tracker, device: torch.device) -> float:
    """Evaluate a checkpoint as ``eval`` says, log the metrics as their own run; return the val mIoU."""
    write_config(cfg, Path(cfg.paths.output_dir))
    path = Path(cfg.checkpoint) if cfg.checkpoint else cache_path(cfg)
    model, _ = load_model(path, {"classes": cfg.dataset.num_classes})
    _, val_set = build_datasets(cfg.dataset)
    _, val_loader = build_loaders(val_set, val_set, 1, cfg.trainer.num_workers, cfg.seed,
                                  stride=math.lcm(INPUT_MULTIPLE, input_multiple(model)))
    settings = eval_settings(cfg.eval)
    with tracker.run(cfg.logger.run_name or f"eval-{path.stem}", run_params(cfg, dist.world_size()) | {"checkpoint": str(path)}, tags_for(cfg, "eval", None)):
        result = evaluate(model.to(device), val_loader, cfg.dataset.num_classes, device, progress=cfg.trainer.progress, eval_cfg=settings)
        tracker.log_metrics(epoch_metrics(result, dataset_classes(cfg.dataset.name).names), 0)
    print(f"{path}: val mIoU {100 * result['miou']:.2f}, pixel acc {100 * result['pixel_acc']:.2f} (eval {settings.describe()})")
    return result["miou"]
