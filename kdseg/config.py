"""Validation of a composed config, before any data or model work: the schema, then the cross-field checks.

:func:`validate` merges the config into the schema (:mod:`kdseg.schema`) and turns what
OmegaConf finds (a missing or unknown key, a value of the wrong type, a choice not offered)
into one :class:`~kdseg.errors.ConfigError` line that names the key, the value and what was
expected; then each field's own check (a range, a multiple), then :func:`cross_checks`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from kdseg import dist
from kdseg.data.classes import dataset_classes
from kdseg.data.folders import LAYOUTS, SPLIT_KEYS
from kdseg.data.voc import LAYOUT_HINT
from kdseg.errors import ConfigError
from kdseg.inference import eval_settings
from kdseg.models import DEFAULT_ARCH, arch_multiple, check_arch_options, check_encoder
from kdseg.runtime import resolve_device
from kdseg.schema import SCHEMA, Check, Config
from kdseg.utils import not_a_file, not_a_folder_to_be

__all__ = ["ConfigError", "cross_checks", "validate"]

VOC_SPLIT_KEYS = ("image_dir", "mask_dir", "val_mask_dir", "train_list", "val_list")
"""The dataset keys of the VOC layout (a list file per split); the folder layouts' are ``SPLIT_KEYS``."""
GENERATED_KEYS = ("num_train", "num_val", "image_size", "seed")
"""The dataset keys a generated dataset is made from (and named after)."""
ONE_IMAGE_BN = (
    "DeepLabV3+'s ASPP image-pooling branch pools each image to 1x1 and BatchNorm cannot normalise one value "
    "per channel in training"
)
"""Why a training batch of one image per process fails (smp's ``Expected more than 1 value per channel``)."""
FOLDER_KEYS = ("paths.data_dir", "paths.cache_dir", "paths.output_dir")
"""Path keys of folders kdseg creates when missing (a file on the way is an error)."""


def _bad(key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"config {key}={value!r}: expected {expected}")


def _require(cond: bool, key: str, value: object, expected: str) -> None:
    if not cond:
        raise _bad(key, value, expected)


def _describe(annotation: Any) -> str:
    """What a field of this type holds, in words."""
    if typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return f"one of {', '.join(str(m.value) for m in annotation)}"
    if typing.get_origin(annotation) in (list, typing.List):
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, "a value")


def _field(schema: type, name: str) -> tuple[Any, Check | None]:
    """The type and check of field ``name`` of the schema dataclass ``schema``."""
    hints = typing.get_type_hints(schema)
    check = next((f.metadata.get("check") for f in dataclasses.fields(schema) if f.name == name), None)
    return hints.get(name), check


def _schema_error(err: OmegaConfBaseException) -> ConfigError:
    """One line for what OmegaConf found, naming the key (``full_key``), the value and what was expected."""
    key = err.full_key or str(err.key)
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"config key {key} is missing")
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"config key {key} is not a kdseg setting (a typo? see `python run.py --cfg job` for every key)")
    schema = err.object_type if dataclasses.is_dataclass(err.object_type) else None
    annotation, check = _field(schema, str(err.key)) if schema is not None else (None, None)
    if check is not None:
        expected = check.expected
    elif annotation is not None:
        expected = _describe(annotation)
    else:
        expected = err.msg.splitlines()[0]
    return _bad(key, err.value, expected)


def _strict(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (as the config holds it) is of the field's scalar type, without conversions:
    OmegaConf would accept ``'3'`` for an integer or ``1`` for a boolean, kdseg's code would not."""
    if value is None or annotation is None:
        return True
    if typing.get_origin(annotation) is typing.Union:
        return any(_strict(a, value) for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _fields(schema: type, node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, Any, Check | None, str | None]]:
    """(key, value, type, check, interpolation or None) of every leaf field, through the nested dataclasses."""
    hints = typing.get_type_hints(schema)
    raw = OmegaConf.to_container(node, resolve=False)
    for f in dataclasses.fields(schema):
        key, annotation = f"{prefix}{f.name}", hints[f.name]
        if f.name not in node:
            continue
        if dataclasses.is_dataclass(annotation):
            yield from _fields(annotation, node[f.name], f"{key}.")
            continue
        value = node[f.name]
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        expression = raw[f.name] if "${" in str(raw[f.name]) else None  # an interpolation, or a list of them
        yield key, value, annotation, f.metadata.get("check"), expression


def _check_fields(cfg: DictConfig) -> None:
    """Every field's exact type and its ``check`` metadata. Values set directly are checked first,
    then interpolated ones (``crop_size: ${.image_size}``), so that an error names the key to change."""
    fields = sorted(_fields(Config, cfg), key=lambda item: item[4] is not None)
    for key, value, annotation, check, expression in fields:
        shown = f"{key}={value!r} (from {expression})" if expression else f"{key}={value!r}"
        expected = check.expected if check else _describe(annotation)
        if not _strict(annotation, value) or (check is not None and value is not None and not check.test(value)):
            raise ConfigError(f"config {shown}: expected {expected}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the key, the value and what was expected, or return: the config is usable."""
    try:
        schema = ConfigStore.instance().load(f"{SCHEMA}.yaml").node  # Config, as registered in kdseg.schema
        OmegaConf.to_object(OmegaConf.merge(schema, cfg))  # resolves and types every value
    except OmegaConfBaseException as err:
        raise _schema_error(err) from None
    _check_fields(cfg)
    cross_checks(cfg)


def cross_checks(cfg: DictConfig) -> None:
    """The checks that relate several keys, or need another module's knowledge (smp's encoders, the
    datasets' class tables, the eval settings, the loss terms); run after the schema's."""
    ds = cfg.dataset
    layout_keys = SPLIT_KEYS if ds.name in LAYOUTS else VOC_SPLIT_KEYS
    for key in layout_keys + (GENERATED_KEYS if ds.generated else ()):
        if ds.get(key) is None:
            raise ConfigError(f"config key dataset.{key} is missing (dataset.name={ds.name} needs it)")
    if ds.name in LAYOUTS or ds.generated:
        n = len(dataset_classes(ds.name).names)
        _require(ds.num_classes == n, "dataset.num_classes", ds.num_classes, f"{n}, the classes of dataset={ds.name}")
    multiples = {}
    for model_key in ("student", "teacher.model"):
        model = OmegaConf.select(cfg, model_key)
        arch, options = model.get("arch", DEFAULT_ARCH), model.get("options") or {}
        check_encoder(model.encoder_name, f"{model_key}.encoder_name")
        check_arch_options(arch, options, model.output_stride, model_key)
        _require(model.classes == ds.num_classes, f"{model_key}.classes", model.classes, f"dataset.num_classes={ds.num_classes}")
        multiples[model_key] = arch_multiple(arch, model.output_stride, options)
    if cfg.teacher.get("pretrained") is not None and cfg.teacher.checkpoint is not None:
        raise ConfigError(f"config teacher.pretrained={cfg.teacher.pretrained!r} and teacher.checkpoint={cfg.teacher.checkpoint!r}: "
                          "expected one of them (the other null)")
    # the teacher sees the student's crops; a pretrained teacher's own multiple is checked when it is loaded
    multiple = math.lcm(*multiples.values())
    for key, sizes in (("dataset.crop_size", [ds.crop_size]), ("dataset.eval_size", list(ds.eval_size))):
        _require(all(v % multiple == 0 for v in sizes), key, sizes[0] if len(sizes) == 1 else sizes,
                 f"a multiple of {multiple} (student {cfg.student.get('arch', DEFAULT_ARCH)}: {multiples['student']}, "
                 f"teacher {cfg.teacher.model.get('arch', DEFAULT_ARCH)}: {multiples['teacher.model']})")
    crop = eval_settings(cfg.eval).crop  # eval.mode, eval.crop, eval.stride, eval.scales, eval.flip
    _require(crop is None or all(c % multiple == 0 for c in crop), "eval.crop", cfg.eval.get("crop"),
             f"a multiple of {multiple} (the student's and the teacher's input multiple)")
    for name, term in cfg.loss.terms.items():
        _require(isinstance(term, DictConfig) and "_target_" in term, f"loss.terms.{name}", term,
                 "a term node with _target_ (a kdseg.losses Term), weight and tap")
        weight = term.get("weight")
        _require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
                 f"loss.terms.{name}.weight", weight, "a number >= 0")
    if cfg.task == "eval":
        _require(cfg.checkpoint is not None or ds.generated, "checkpoint", cfg.checkpoint,
                 "a checkpoint path for task=eval on real data")
    _require(cfg.task != "teacher" or ds.get("tune_fraction") is None, "dataset.tune_fraction", ds.get("tune_fraction"),
             "null with task=teacher (a teacher trains on the whole train split; tuning runs are students' runs)")
    check_training_batches(cfg)
    check_paths(cfg)


def check_paths(cfg: DictConfig) -> None:
    """Every path-valued key this task reads is of the right kind (a file, a folder), or missing only
    where kdseg creates it; the error says what the path is and what was expected.

    A missing dataset root is left to the dataset, whose message names the layout it expects;
    ``trainer.resume`` to :func:`kdseg.resume.plan_run`, which looks into the folder or file.
    """
    files = []
    if cfg.task == "eval" and cfg.checkpoint is not None:
        files.append(("checkpoint", cfg.checkpoint))
    if cfg.task == "distill" and _has_terms(cfg) and cfg.teacher.checkpoint is not None:
        files.append(("teacher.checkpoint", cfg.teacher.checkpoint))
    for key, value in files:
        if not Path(value).is_file():
            hint = " (such as last.pt or best.pt in a run folder)" if Path(value).is_dir() else ""
            raise ConfigError(f"config {key}='{value}' {not_a_file(value)}: expected a checkpoint file{hint}")
    ds = cfg.dataset
    folders = list(FOLDER_KEYS) + (["dataset.root"] if ds.generated else [])
    for key in folders:
        value = OmegaConf.select(cfg, key)
        problem = not_a_folder_to_be(value)
        if problem is not None:
            raise ConfigError(f"config {key}='{value}' {problem}: expected a folder (kdseg creates it if missing)")
    if not ds.generated and Path(ds.root).exists() and not Path(ds.root).is_dir():
        hint = LAYOUTS[ds.name].hint if ds.name in LAYOUTS else LAYOUT_HINT
        raise ConfigError(f"config dataset.root='{ds.root}' is a file, not a folder: expected {hint}")


def _has_terms(cfg: DictConfig) -> bool:
    """Whether any loss term is active (weight > 0): the run needs a teacher."""
    return any(term.get("weight", 0) > 0 for term in cfg.loss.terms.values())


def _shown(node: DictConfig, key: str, where: str) -> str:
    """``where=value``, with the interpolation it came from (``${trainer.batch_size}``) if any."""
    raw = OmegaConf.to_container(node, resolve=False)[key]
    return f"{where}={node[key]!r}" + (f" (from {raw})" if "${" in str(raw) else "")


def check_training_batches(cfg: DictConfig) -> None:
    """A training batch of one image per process is refused before any work (:data:`ONE_IMAGE_BN`).

    It works, and is allowed, with ``trainer.sync_bn=true`` under DDP on CUDA (BatchNorm then
    normalises over the global batch of world-size images). The cached teacher of a generated
    dataset trains in one process, so its ``teacher.train.batch_size`` needs 2 or more.
    """
    trains_cached_teacher = cfg.task == "distill" and cfg.dataset.generated and cfg.teacher.checkpoint is None and _has_terms(cfg)
    checks = []
    if cfg.task == "distill":
        checks.append((cfg.trainer, "trainer", True))
    if cfg.task == "teacher" or trains_cached_teacher:
        checks.append((cfg.teacher.train, "teacher.train", cfg.task == "teacher"))
    for node, where, may_sync in checks:
        if node.batch_size != 1:
            continue
        synced = may_sync and cfg.trainer.sync_bn and dist.launched_distributed() and resolve_device(cfg.trainer.device).type == "cuda"
        if synced:
            continue
        works = "a batch of 2 or more per process"
        if may_sync:
            works += ", or trainer.sync_bn=true under DDP on CUDA (BatchNorm over the global batch of all processes)"
        else:
            works += " (the cached teacher trains in one process, so trainer.sync_bn cannot help)"
        raise ConfigError(f"config {_shown(node, 'batch_size', f'{where}.batch_size')}: a training batch of 1 image per process "
                          f"cannot train: {ONE_IMAGE_BN}; use {works}")
