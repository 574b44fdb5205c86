"""The config schema: one dataclass per config group, its fields' types, choices and ranges.

The yaml files in ``conf/`` hold the defaults; these dataclasses say what each key may hold.
:func:`kdseg.config.validate` merges a composed config into :class:`Config` (OmegaConf checks
every key's presence and type, and the choices of the Enum fields: each Enum is defined once,
in the module that uses the value) and then applies each field's ``check`` metadata (ranges,
multiples), so every value is checked in one place. Checks that relate two fields are in
:func:`kdseg.config.cross_checks`.

Sections another module owns are typed ``Any`` here and checked by their owner, once, from
``validate``: ``eval`` by :func:`kdseg.inference.eval_settings`, each node of ``loss.terms``
(free-form: the arguments of its Term) by the Term's constructor when the run builds it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from kdseg.checkpoint import Upload
from kdseg.data.classes import DATASET_NAMES
from kdseg.data.dataset import OnBadSample
from kdseg.data.synthetic import MIN_SIZE
from kdseg.data.transforms import EvalMode
from kdseg.distill import BnMode
from kdseg.models import DEFAULT_ARCH, INPUT_MULTIPLE
from kdseg.runtime import Amp

# OmegaConf reads these annotations at run time: the typing aliases (Dict, List, Optional) it
# understands, not ``X | None``.


class Task(str, Enum):
    """``task``: what ``run.py`` does."""

    distill = "distill"
    """train a student with the chosen losses"""
    teacher = "teacher"
    """train a teacher (cross-entropy only)"""
    eval = "eval"
    """evaluate ``checkpoint`` (or the cached teacher) on the val split"""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes (``trainer.compile_mode``)."""


@dataclass(frozen=True)
class Check:
    """A field's value check: ``test(value)`` must hold; ``expected`` says what it must be."""

    test: Callable[[Any], bool]
    expected: str


def checked(test: Callable[[Any], bool], expected: str, default: Any = MISSING) -> Any:
    """A dataclass field whose value must pass ``test`` (``None`` is left to the field's Optional type)."""
    return field(default=default, metadata={"check": Check(test, expected)})


def at_least(minimum: int, default: Any = MISSING) -> Any:
    return checked(lambda v: v >= minimum, f"an integer >= {minimum}", default)


def positive() -> Any:
    return checked(lambda v: v > 0, "a number > 0")


def non_negative() -> Any:
    return checked(lambda v: v >= 0, "a number >= 0")


def one_of(*values: Any) -> Any:
    shown = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    return checked(lambda v: any(v == c and type(v) is type(c) for c in values), f"one of {shown}")


def _is_size(value: Any) -> bool:
    return len(value) == 2 and all(v >= INPUT_MULTIPLE and v % INPUT_MULTIPLE == 0 for v in value)


AUTO_TRUE_FALSE = ("auto", True, False)


@dataclass
class ModelConf:
    """``student`` and ``teacher.model``: the arguments of :func:`kdseg.models.build_model`."""

    _target_: str = MISSING
    arch: str = DEFAULT_ARCH
    encoder_name: str = MISSING
    encoder_weights: Optional[str] = MISSING
    classes: int = MISSING
    output_stride: Optional[int] = one_of(8, 16)
    zero_init_residual: bool = MISSING
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConf:
    """What the student's and the teacher's training share: batch, learning rate, optimiser, schedule, AMP."""

    max_iters: Optional[int] = at_least(1)
    batch_size: int = at_least(1)
    base_lr: float = positive()
    base_batch: int = at_least(1)
    head_lr_mult: float = positive()
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    amp: Amp = MISSING


@dataclass
class TeacherTrainConf(OptimConf):
    """``teacher.train``: how a teacher is trained (``task=teacher`` and the cached teacher), and its cache key."""

    epochs: int = at_least(1)
    seed: int = at_least(0)


@dataclass
class TeacherConf:
    model: ModelConf = MISSING
    checkpoint: Optional[str] = MISSING
    pretrained: Optional[str] = None
    bn_mode: BnMode = MISSING
    grad: bool = MISSING
    train: TeacherTrainConf = MISSING


@dataclass
class DatasetConf:
    """``dataset``; the keys of one layout are required by :func:`kdseg.config.cross_checks`."""

    name: str = one_of(*DATASET_NAMES)
    root: str = MISSING
    generated: bool = MISSING
    num_classes: int = at_least(2)
    base_size: int = at_least(INPUT_MULTIPLE)
    crop_size: int = checked(
        lambda v: v >= INPUT_MULTIPLE and v % INPUT_MULTIPLE == 0,
        f"a multiple of {INPUT_MULTIPLE} (DeepLabV3+ needs input sizes divisible by {INPUT_MULTIPLE}: "
        "the output stride and the decoder's x4 upsampling)",
    )  # and of the models' own multiples (kdseg.config.cross_checks)
    eval_size: List[int] = checked(_is_size, f"[height, width], multiples of {INPUT_MULTIPLE} (where GFLOPs and FPS are measured)")
    scale_range: List[float] = checked(lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max")
    blur_prob: float = checked(lambda v: 0 <= v <= 1, "a probability in [0, 1]")
    eval_mode: EvalMode = MISSING
    on_bad_sample: OnBadSample = MISSING
    # a tuning run (kdseg.study): trains on the train split but a seeded held-out part, scored on that part
    tune_fraction: Optional[float] = checked(lambda v: v is None or 0 < v < 1, "null or a fraction in (0, 1)", default=None)
    tune_seed: int = at_least(0, default=0)
    # VOC layout (a list file per split)
    image_dir: Optional[str] = None
    mask_dir: Optional[str] = None
    val_mask_dir: Optional[str] = None
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    # folder layouts (Cityscapes, ADE20K: a folder per split)
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    # generated datasets (the built-in set)
    num_train: Optional[int] = at_least(1, default=None)
    num_val: Optional[int] = at_least(1, default=None)
    image_size: Optional[int] = at_least(MIN_SIZE, default=None)
    seed: Optional[int] = at_least(0, default=None)


@dataclass
class LossConf:
    pi_lambda: float = non_negative()
    pa_lambda: float = non_negative()
    terms: Dict[str, Any] = MISSING
    search: Dict[str, str] = field(default_factory=dict)  # the option's tuning search space (kdseg.study)


@dataclass
class TrainerConf(OptimConf):
    epochs: int = at_least(1)
    num_workers: int = at_least(0)
    eval_every: int = at_least(1)
    device: str = MISSING
    channels_last: Any = one_of(*AUTO_TRUE_FALSE)
    cudnn_benchmark: Any = one_of(*AUTO_TRUE_FALSE)
    deterministic: bool = MISSING
    compile: bool = MISSING
    compile_mode: str = one_of(*COMPILE_MODES)
    num_threads: Optional[int] = at_least(1)
    pin_memory: Any = one_of(*AUTO_TRUE_FALSE)
    persistent_workers: bool = MISSING
    sync_bn: bool = MISSING
    progress: bool = MISSING
    resume: str = checked(bool, "auto, off, or a checkpoint (or run folder) path")


@dataclass
class EvalConf:
    """``eval``: checked by :func:`kdseg.inference.eval_settings`."""

    mode: Any = MISSING
    crop: Any = MISSING
    stride: Any = MISSING
    scales: Any = MISSING
    flip: Any = MISSING


@dataclass
class LoggerConf:
    enabled: bool = MISSING
    tracking_uri: str = MISSING
    experiment_name: str = MISSING
    run_name: Optional[str] = MISSING
    log_checkpoints: Upload = MISSING
    log_model: bool = MISSING
    system_metrics: bool = MISSING
    retries: int = at_least(0)
    retry_wait_s: float = non_negative()


@dataclass
class PathsConf:
    root_dir: str = MISSING
    data_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class SpeedConf:
    enabled: bool = MISSING
    repeats: int = at_least(1)
    warmup: int = at_least(0)
    rounds: int = at_least(1)


@dataclass
class Config:
    """The composed config ``run.py`` gets (without Hydra's own ``hydra`` node)."""

    task: Task = MISSING
    seed: int = at_least(0)
    checkpoint: Optional[str] = MISSING
    teacher: TeacherConf = MISSING
    student: ModelConf = MISSING
    dataset: DatasetConf = MISSING
    loss: LossConf = MISSING
    trainer: TrainerConf = MISSING
    eval: EvalConf = MISSING
    logger: LoggerConf = MISSING
    paths: PathsConf = MISSING
    speed: SpeedConf = MISSING


SCHEMA = "kdseg_schema"
"""The name :class:`Config` is registered under in Hydra's ConfigStore (``validate`` merges into it;
a config of your own can also list it in its defaults to be typed while Hydra composes it)."""
ConfigStore.instance().store(name=SCHEMA, node=Config)
