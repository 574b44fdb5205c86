"""Explicit validation of a composed config: every check runs before any data or model work."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

TASKS = ("distill", "teacher", "eval")
DATASETS = ("synthetic", "voc", "voc_aug")
REQUIRED = {
    "dataset": ("name", "root", "num_classes", "image_dir", "mask_dir", "val_mask_dir", "train_list", "val_list", "base_size", "crop_size", "scale_range", "blur_prob", "eval_mode"),
    "student": ("encoder_name", "classes", "output_stride"),
    "teacher": ("model", "checkpoint", "bn_mode", "seed"),
    "loss": ("pi_lambda", "pa_lambda", "terms"),
    "trainer": ("epochs", "teacher_epochs", "max_iters", "batch_size", "num_workers", "base_lr", "base_batch", "head_lr_mult", "eval_every", "device", "amp"),
}


class ConfigError(ValueError):
    """A config value is missing, mistyped or out of range."""


def _require(cond: bool, key: str, value: object, expected: str) -> None:
    if not cond:
        raise ConfigError(f"config {key}={value!r}: expected {expected}")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key, value, f"an integer >= {minimum}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the key, the value and what was expected."""
    for group, keys in REQUIRED.items():
        for key in keys:
            if OmegaConf.select(cfg, f"{group}.{key}", default="__missing__") == "__missing__":
                raise ConfigError(f"config key {group}.{key} is missing")
    _require(cfg.task in TASKS, "task", cfg.task, f"one of {', '.join(TASKS)}")
    _positive_int(cfg, "seed", minimum=0)
    ds = cfg.dataset
    _require(ds.name in DATASETS, "dataset.name", ds.name, f"one of {', '.join(DATASETS)}")
    _positive_int(cfg, "dataset.num_classes", minimum=2)
    if ds.name == "synthetic":
        _require(ds.num_classes == 21, "dataset.num_classes", ds.num_classes, "21 for the built-in dataset")
        for key in ("num_train", "num_val"):
            _positive_int(cfg, f"dataset.{key}")
        _positive_int(cfg, "dataset.image_size", minimum=32)
    for key in ("base_size", "crop_size"):
        _positive_int(cfg, f"dataset.{key}", minimum=16)
    for model_key in ("student", "teacher.model"):
        stride = OmegaConf.select(cfg, f"{model_key}.output_stride")
        _require(stride in (8, 16), f"{model_key}.output_stride", stride, "8 or 16")
        _require(
            ds.crop_size % 16 == 0, "dataset.crop_size", ds.crop_size,
            "a multiple of 16 (DeepLabV3+ needs input sizes divisible by the encoder's total stride)",
        )
        classes = OmegaConf.select(cfg, f"{model_key}.classes")
        _require(classes == ds.num_classes, f"{model_key}.classes", classes, f"dataset.num_classes={ds.num_classes}")
    lo_hi = list(ds.scale_range)
    _require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], "dataset.scale_range", lo_hi, "[min, max] with 0 < min <= max")
    _require(0 <= ds.blur_prob <= 1, "dataset.blur_prob", ds.blur_prob, "a probability in [0, 1]")
    _require(ds.eval_mode in ("full", "center_crop"), "dataset.eval_mode", ds.eval_mode, "full or center_crop")
    for key in ("pi_lambda", "pa_lambda"):
        value = cfg.loss[key]
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, f"loss.{key}", value, "a number >= 0")
    for name, term in cfg.loss.terms.items():
        _require(isinstance(term.weight, (int, float)) and term.weight >= 0, f"loss.terms.{name}.weight", term.weight, "a number >= 0")
        _require(isinstance(term.get("tap"), str) and term.tap, f"loss.terms.{name}.tap", term.get("tap"), "a module path")
    _require(cfg.teacher.bn_mode in ("eval", "train"), "teacher.bn_mode", cfg.teacher.bn_mode, "eval or train")
    tr = cfg.trainer
    for key in ("epochs", "teacher_epochs", "batch_size", "eval_every", "base_batch"):
        _positive_int(cfg, f"trainer.{key}")
    _positive_int(cfg, "trainer.num_workers", minimum=0)
    if tr.max_iters is not None:
        _positive_int(cfg, "trainer.max_iters")
    for key in ("base_lr", "head_lr_mult"):
        _require(isinstance(tr[key], (int, float)) and tr[key] > 0, f"trainer.{key}", tr[key], "a number > 0")
    _require(tr.amp in ("auto", "bf16", "fp16", "off"), "trainer.amp", tr.amp, "auto, bf16, fp16 or off")
    _require(tr.channels_last in ("auto", True, False), "trainer.channels_last", tr.channels_last, "auto, true or false")
    _require(tr.sync_bn in (True, False), "trainer.sync_bn", tr.sync_bn, "true or false")
    if cfg.task == "eval":
        _require(cfg.checkpoint is not None or ds.name == "synthetic", "checkpoint", cfg.checkpoint, "a checkpoint path for task=eval on real data")
