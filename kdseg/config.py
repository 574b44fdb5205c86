"""Explicit validation of a composed config: every check runs before any data or model work."""
from __future__ import annotations

import difflib

from omegaconf import DictConfig, OmegaConf

from kdseg.data.classes import dataset_classes
from kdseg.data.folders import LAYOUTS, SPLIT_KEYS
from kdseg.data.voc import BAD_SAMPLE_POLICIES
from kdseg.errors import ConfigError
from kdseg.inference import eval_settings

__all__ = ["ConfigError", "validate"]

TASKS = ("distill", "teacher", "eval")
DATASETS = ("synthetic", "voc", "voc_aug", "cityscapes", "ade20k")
VOC_SPLIT_KEYS = ("image_dir", "mask_dir", "val_mask_dir", "train_list", "val_list")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
REQUIRED = {
    "dataset": ("name", "root", "num_classes", "base_size", "crop_size", "eval_size", "scale_range", "blur_prob", "eval_mode", "on_bad_sample"),
    "student": ("encoder_name", "classes", "output_stride"),
    "teacher": ("model", "checkpoint", "bn_mode", "grad", "seed"),
    "loss": ("pi_lambda", "pa_lambda", "terms"),
    "trainer": ("epochs", "teacher_epochs", "max_iters", "batch_size", "num_workers", "base_lr", "base_batch", "head_lr_mult", "eval_every", "device", "amp",
                "channels_last", "cudnn_benchmark", "deterministic", "compile", "compile_mode", "num_threads", "pin_memory", "persistent_workers", "resume"),
    "eval": ("mode", "crop", "stride", "scales", "flip"),
    "speed": ("enabled", "repeats", "warmup"),
}


def _require(cond: bool, key: str, value: object, expected: str) -> None:
    if not cond:
        raise ConfigError(f"config {key}={value!r}: expected {expected}")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key, value, f"an integer >= {minimum}")


def _check_encoder(cfg: DictConfig, key: str) -> None:
    """An encoder smp can build; the error lists close matches and every valid name."""
    from kdseg.models import encoder_names

    name, valid = OmegaConf.select(cfg, key), encoder_names()
    if name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"config {key}={name!r}: unknown encoder{hint} Valid smp encoders: {', '.join(valid)}")


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
    for key in SPLIT_KEYS if ds.name in LAYOUTS else VOC_SPLIT_KEYS:
        if OmegaConf.select(ds, key, default="__missing__") == "__missing__":
            raise ConfigError(f"config key dataset.{key} is missing")
    if ds.name in LAYOUTS:
        n = len(dataset_classes(ds.name).names)
        _require(ds.num_classes == n, "dataset.num_classes", ds.num_classes, f"{n}, the classes of dataset={ds.name}")
    if ds.name == "synthetic":
        _require(ds.num_classes == 21, "dataset.num_classes", ds.num_classes, "21 for the built-in dataset")
        for key in ("num_train", "num_val"):
            _positive_int(cfg, f"dataset.{key}")
        _positive_int(cfg, "dataset.image_size", minimum=32)
    for key in ("base_size", "crop_size"):
        _positive_int(cfg, f"dataset.{key}", minimum=16)
    _require(ds.on_bad_sample in BAD_SAMPLE_POLICIES, "dataset.on_bad_sample", ds.on_bad_sample,
             " or ".join(BAD_SAMPLE_POLICIES))
    for model_key in ("student", "teacher.model"):
        _check_encoder(cfg, f"{model_key}.encoder_name")
        stride = OmegaConf.select(cfg, f"{model_key}.output_stride")
        _require(stride in (8, 16), f"{model_key}.output_stride", stride, "8 or 16")
        classes = OmegaConf.select(cfg, f"{model_key}.classes")
        _require(classes == ds.num_classes, f"{model_key}.classes", classes, f"dataset.num_classes={ds.num_classes}")
    _require(
        ds.crop_size % 16 == 0, "dataset.crop_size", ds.crop_size,
        "a multiple of 16 (DeepLabV3+ needs input sizes divisible by 16: the output stride and the decoder's x4 upsampling)",
    )
    size = OmegaConf.to_object(ds.eval_size) if OmegaConf.is_list(ds.eval_size) else ds.eval_size
    _require(
        isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 and v % 16 == 0 for v in size),
        "dataset.eval_size", size, "[height, width], multiples of 16 (where GFLOPs and FPS are measured)",
    )
    _require(isinstance(cfg.speed.enabled, bool), "speed.enabled", cfg.speed.enabled, "true or false")
    _positive_int(cfg, "speed.repeats")
    _positive_int(cfg, "speed.warmup", minimum=0)
    lo_hi = list(ds.scale_range)
    _require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], "dataset.scale_range", lo_hi, "[min, max] with 0 < min <= max")
    _require(0 <= ds.blur_prob <= 1, "dataset.blur_prob", ds.blur_prob, "a probability in [0, 1]")
    _require(ds.eval_mode in ("full", "center_crop"), "dataset.eval_mode", ds.eval_mode, "full or center_crop")
    eval_settings(cfg.eval)  # eval.mode, eval.crop, eval.stride, eval.scales, eval.flip
    for key in ("pi_lambda", "pa_lambda"):
        value = cfg.loss[key]
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, f"loss.{key}", value, "a number >= 0")
    for name, term in cfg.loss.terms.items():
        _require(isinstance(term, DictConfig) and "_target_" in term, f"loss.terms.{name}", term,
                 "a term node with _target_ (a kdseg.losses Term), weight and tap")
        weight = term.get("weight")
        _require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
                 f"loss.terms.{name}.weight", weight, "a number >= 0")
        _require(isinstance(term.get("tap"), str) and term.tap, f"loss.terms.{name}.tap", term.get("tap"), "a module path or logits")
    _require(cfg.teacher.bn_mode in ("eval", "train"), "teacher.bn_mode", cfg.teacher.bn_mode, "eval or train")
    _require(isinstance(cfg.teacher.grad, bool), "teacher.grad", cfg.teacher.grad, "true or false")
    tr = cfg.trainer
    for key in ("epochs", "teacher_epochs", "batch_size", "eval_every", "base_batch"):
        _positive_int(cfg, f"trainer.{key}")
    _positive_int(cfg, "trainer.num_workers", minimum=0)
    if tr.max_iters is not None:
        _positive_int(cfg, "trainer.max_iters")
    for key in ("base_lr", "head_lr_mult"):
        _require(isinstance(tr[key], (int, float)) and tr[key] > 0, f"trainer.{key}", tr[key], "a number > 0")
    _require(tr.amp in ("auto", "bf16", "fp16", "off"), "trainer.amp", tr.amp, "auto, bf16, fp16 or off")
    for key in ("channels_last", "cudnn_benchmark", "pin_memory"):
        _require(tr[key] in ("auto", True, False), f"trainer.{key}", tr[key], "auto, true or false")
    for key in ("deterministic", "compile", "persistent_workers"):
        _require(isinstance(tr[key], bool), f"trainer.{key}", tr[key], "true or false")
    _require(tr.compile_mode in COMPILE_MODES, "trainer.compile_mode", tr.compile_mode, f"one of {', '.join(COMPILE_MODES)}")
    if tr.num_threads is not None:
        _positive_int(cfg, "trainer.num_threads")
    _require(isinstance(tr.resume, str) and tr.resume != "", "trainer.resume", tr.resume, "auto, off, or a checkpoint (or run folder) path")
    _require(tr.sync_bn in (True, False), "trainer.sync_bn", tr.sync_bn, "true or false")
    if cfg.task == "eval":
        _require(cfg.checkpoint is not None or ds.name == "synthetic", "checkpoint", cfg.checkpoint, "a checkpoint path for task=eval on real data")
