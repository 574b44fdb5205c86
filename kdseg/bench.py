"""Throughput and memory of the training code paths: ``python -m kdseg.bench``.

One process measures, after warm-up and as medians over repeats, the images per second of

- teacher inference (``Distiller.run_teacher``, the pass a distillation step makes),
- a student train step with cross-entropy only,
- a distillation step (cross-entropy + pi + pa, frozen teacher: kdseg's default),
- a reference-style step (teacher in train mode and back-propagated through, as the original
  code did; METHOD.md), whose optimiser still holds only the student,
- the train data loader (built-in set, train transforms, the configured workers),
- evaluation (``evaluate``: the val loader, the student, the confusion matrix),

plus the ratios ``overhead``, ``speedup_vs_reference``, ``loader_headroom`` and
``memory_ratio``, a scaling table over crop and batch sizes, and ablations that flip one
speed switch at a time. Every step runs through ``Trainer.train_step`` (and so
``Distiller.forward``) built from the composed Hydra config: the code that trains, not a copy.
The repeats of the modes being compared are interleaved, so that load from other processes
on a shared machine hits every mode alike.

Peak memory per training mode is measured in a fresh subprocess per mode (a few steps each):
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size (``VmHWM``,
which, unlike ``ru_maxrss``, does not inherit the parent's peak across fork + exec). The CPU
process holds about 0.7 GiB before any model exists (torch's libraries), so the figure compared
between modes is the peak *above* that baseline, the CPU analogue of CUDA allocated memory;
the absolute peaks are printed too.

Extra arguments are Hydra overrides of the composed config, e.g. ``trainer.channels_last=true``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from kdseg.config import validate
from kdseg.data import build_datasets, build_loaders
from kdseg.data.classes import IGNORE_INDEX
from kdseg.distill import Distiller, build_terms
from kdseg.fused.group import TeacherPass
from kdseg.memory import current_memory, peak_memory
from kdseg.metrics import ConfusionMatrix
from kdseg.runtime import amp_policy, auto_flag, configure_backends, resolve_device, seed_everything
from kdseg.train import Trainer, evaluate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TRAIN_MODES = ("student", "distill", "reference")
LABELS = {
    "teacher": "teacher inference",
    "student": "student step (CE only)",
    "distill": "distillation step (pi + pa)",
    "reference": "reference-style step (teacher train mode + backward)",
    "loader": "data loader",
    "eval": "evaluation",
}
MEMORY_STEPS = 3
MEMORY_TAG = "KDSEG_MEMORY "
STDERR_TAIL = 2000
"""Characters of a failed memory subprocess's stderr quoted in the error (its traceback's end)."""
DEFAULT_THREADS = torch.get_num_threads()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kdseg.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet101", help="teacher encoder (default resnet101)")
    parser.add_argument("--student", default="resnet18", help="student encoder (default resnet18)")
    parser.add_argument("--crop", type=int, default=128, help="square crop size, a multiple of 16 (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--iterations", type=int, default=5, help="timed calls per repeat (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--scaling-crops", default="64,128,256", help="crop sizes of the scaling table ('' = none)")
    parser.add_argument("--scaling-batches", default="2,8", help="batch sizes of the scaling table ('' = none)")
    parser.add_argument("--scaling-iterations", type=int, default=2, help="timed calls per repeat in the scaling table")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="repeats in the scaling table")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode peak memory subprocesses")
    parser.add_argument("--no-ablations", action="store_true", help="skip the one-switch-at-a-time ablations")
    parser.add_argument("--compile", action="store_true", help="also ablate trainer.compile (slow: compiles the student)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--students", type=int, metavar="N",
                        help="measure only a fused step of N distilling students with one teacher pass (hydra/launcher=fused) "
                             "against N separate distillation steps: fused_overhead and fused_speedup")
    parser.add_argument("--memory-child", choices=TRAIN_MODES, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.channels_last=true")
    args = parser.parse_args(argv)
    batches = [args.batch] + [int(b) for b in args.scaling_batches.split(",") if b.strip()]
    if args.students is not None and args.students < 1:
        parser.error(f"--students must be 1 or more (got {args.students})")
    if min(batches) < 2:
        parser.error(f"batch sizes must be >= 2 (got {batches}): a training step's BatchNorm in DeepLabV3+'s "
                     "image-pooling branch sees one value per channel at batch 1")
    return args


def bench_config(args: argparse.Namespace) -> DictConfig:
    """The run config at the benchmark's size: built-in set at ``crop`` px, paper loss, no logging."""
    n_train = args.batch * max(args.iterations, 2)
    overrides = [
        f"paths.root_dir={Path.cwd()}",
        f"paths.output_dir={Path(tempfile.gettempdir()) / 'kdseg-bench'}",
        "logger=none",
        "loss=pi_pa",
        "dataset=synthetic",
        f"dataset.image_size={args.crop}",
        f"dataset.num_train={n_train}",
        f"dataset.num_val={max(2 * args.batch, 8)}",
        f"teacher.model.encoder_name={args.teacher}",
        f"student.encoder_name={args.student}",
        f"trainer.batch_size={args.batch}",
        f"trainer.device={args.device}",
        "trainer.progress=false",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def make_loaders(cfg: DictConfig, device: torch.device, **changes: Any) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders as ``kdseg.job.fit_steps`` builds them (``changes`` override trainer keys)."""
    tr = OmegaConf.merge(cfg.trainer, changes)
    return build_loaders(
        *build_datasets(cfg.dataset), tr.batch_size, tr.num_workers, cfg.seed,
        pin_memory=auto_flag(tr.pin_memory, device), persistent_workers=tr.persistent_workers,
    )


def build_trainer(
    cfg: DictConfig, mode: str, device: torch.device, loaders: tuple[DataLoader, DataLoader], teacher: torch.nn.Module | None = None,
) -> Trainer:
    """A Trainer around the Distiller of ``mode`` (student | distill | reference), in train mode
    (``teacher``: one already built, shared with other trainers)."""
    seed_everything(cfg.seed)
    student = instantiate(cfg.student)
    if mode == "student":
        model = Distiller(student)
    else:
        teacher, terms = teacher if teacher is not None else instantiate(cfg.teacher.model), build_terms(cfg.loss.terms)
        size = cfg.dataset.crop_size
        if mode == "distill":
            model = Distiller(student, teacher, terms, teacher_bn_mode=cfg.teacher.bn_mode, teacher_grad=cfg.teacher.grad, input_size=size)
        else:
            model = Distiller(student, teacher, terms, teacher_bn_mode="train", teacher_grad=True, input_size=size)
    trainer = Trainer(
        model, *loaders, cfg=cfg.trainer, epochs=cfg.trainer.epochs, num_classes=cfg.dataset.num_classes,
        out_dir=cfg.paths.output_dir, model_config={}, device=device,
    )
    trainer.model.train()
    return trainer


def random_batch(batch: int, crop: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A host batch shaped like the loader's (pinned for CUDA); content does not change the cost."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=g)
    masks = torch.randint(0, num_classes, (batch, crop, crop), generator=g)
    masks[:, :2] = IGNORE_INDEX
    if device.type == "cuda":
        images, masks = images.pin_memory(), masks.pin_memory()
    return images, masks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def backends_of(trainer: Trainer | None) -> Iterator[None]:
    """Within the block, the process-wide switches (threads, cuDNN) of ``trainer``'s config; the
    ones in force before are restored after it. ``None``: the switches as they are."""
    if trainer is None:
        yield
        return
    saved = torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.set_num_threads(trainer.cfg.num_threads or DEFAULT_THREADS)
    configure_backends(trainer.cfg, trainer.device)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


def round_robin(
    calls: dict[str, tuple[Trainer | None, Callable[[], Any]]], device: torch.device, warmup: int, iterations: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function; repeats interleave the functions.

    Each function comes with the trainer whose process-wide switches it runs under (or None).
    """
    for trainer, fn in calls.values():
        with backends_of(trainer):
            for _ in range(warmup):
                fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (trainer, fn) in calls.items():
            with backends_of(trainer):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(iterations):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - t0) / iterations)
    return {name: statistics.median(ts) for name, ts in times.items()}


def step_calls(
    trainers: dict[str, Trainer], batch: tuple[torch.Tensor, torch.Tensor], modes: Sequence[str] = TRAIN_MODES,
) -> dict[str, tuple[Trainer, Callable[[], Any]]]:
    """Teacher inference and the train steps of ``modes`` on one host batch."""
    distill = trainers["distill"]
    images_dev = batch[0].to(distill.device, memory_format=distill.memory_format)

    def teacher() -> None:
        with distill.autocast():
            distill.model.run_teacher(images_dev)
        distill.model.teacher_taps.clear()

    calls = {"teacher": (distill, teacher)}
    for mode in modes:
        calls[mode] = (trainers[mode], lambda t=trainers[mode]: t.train_step(*batch))
    return calls


def build_fused(cfg: DictConfig, n: int, device: torch.device, loaders: tuple[DataLoader, DataLoader]) -> tuple[list[Trainer], Callable[[], Any]]:
    """``n`` distillation trainers sharing one teacher and one teacher pass per batch, as a fused group
    trains them (:class:`kdseg.fused.group.TeacherPass`), and a function that bumps the batch they are on."""
    batch = [0]
    teacher_pass = TeacherPass(lambda: batch[0])
    teacher = instantiate(cfg.teacher.model)
    trainers = [build_trainer(cfg, "distill", device, loaders, teacher=teacher) for _ in range(n)]
    for trainer in trainers:
        trainer.model.teacher_pass = teacher_pass

    def next_batch() -> None:
        batch[0] += 1

    return trainers, next_batch


def fused_ratios(t: dict[str, float], n: int) -> dict[str, float]:
    """How close a fused step of ``n`` students comes to the unavoidable work, and what it saves."""
    return {
        "fused_overhead": t["fused"] / (n * t["student"] + t["teacher"]),
        "fused_speedup": n * t["distill"] / t["fused"],
    }


def bench_fused(
    args: argparse.Namespace, cfg: DictConfig, device: torch.device, loaders: tuple[DataLoader, DataLoader],
    trainers: dict[str, Trainer], batch: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    """``--students N``: the fused step of N students against its parts, interleaved as :func:`round_robin` does."""
    n = args.students
    fused, next_batch = build_fused(cfg, n, device, loaders)

    def fused_step() -> None:
        next_batch()
        for trainer in fused:
            trainer.train_step(*batch)

    calls = step_calls(trainers, batch, ("student", "distill")) | {"fused": (fused[0], fused_step)}
    t = round_robin(calls, device, args.warmup, args.iterations, args.repeats)
    result = {"students": n, "ms_per_batch": {name: 1000 * sec for name, sec in t.items()}} | fused_ratios(t, n)
    rows = [[LABELS.get(name, f"fused step of {n} students (one teacher pass)"), _f(1000 * sec)] for name, sec in t.items()]
    print(markdown_table(["measurement", "ms/batch"], rows))
    print(f"\nfused_overhead = t(fused step of {n}) / ({n} * t(student step) + t(teacher inference)) = {result['fused_overhead']:.3f}")
    print(f"fused_speedup = {n} * t(distillation step) / t(fused step of {n}) = {result['fused_speedup']:.3f}")
    result["fused_speedup_limit"] = n * t["distill"] / (n * t["student"] + t["teacher"])
    print(f"fused_speedup at fused_overhead 1.0 (no cost beyond the unavoidable work): {n} * t(distillation step) / "
          f"({n} * t(student step) + t(teacher inference)) = {result['fused_speedup_limit']:.3f}", flush=True)
    return result


def loader_seconds_per_batch(loader: DataLoader, warmup: int, repeats: int) -> float:
    """Median seconds per batch over whole epochs (a fresh iterator each, as every training epoch)."""
    for _ in range(max(warmup, 1)):
        for _ in loader:
            pass
    times = []
    for _ in range(repeats):
        t0, n = time.perf_counter(), 0
        for _ in loader:
            n += 1
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def eval_seconds_per_image(trainer: Trainer, loader: DataLoader, warmup: int, repeats: int) -> float:
    """Median seconds per image of ``evaluate`` over the val loader, as ``Trainer.steps`` calls it."""
    times = []
    for i in range(max(warmup, 1) + repeats):
        t0 = time.perf_counter()
        evaluate(trainer.student, loader, trainer.num_classes, trainer.device, trainer.amp_dtype)
        if i >= max(warmup, 1):
            times.append((time.perf_counter() - t0) / len(loader.dataset))
    return statistics.median(times)


def ratios(t: dict[str, float]) -> dict[str, float]:
    """The acceptance ratios from seconds per batch (``loader`` is seconds per batch too)."""
    out = {
        "overhead": t["distill"] / (t["student"] + t["teacher"]),
        "speedup_vs_reference": t["reference"] / t["distill"],
    }
    if "loader" in t:
        out["loader_headroom"] = t["distill"] / t["loader"]
    return out


# ---------------------------------------------------------------- memory (subprocesses)

def memory_child(args: argparse.Namespace) -> None:
    """Subprocess entry: a few steps of one training mode, then its memory as one tagged JSON line."""
    cfg = bench_config(args)
    device = resolve_device(cfg.trainer.device)
    configure_backends(cfg.trainer, device)
    loaders = make_loaders(cfg, device)
    batch = random_batch(args.batch, args.crop, cfg.dataset.num_classes, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = current_memory(device)
    trainer = build_trainer(cfg, args.memory_child, device, loaders)
    for _ in range(MEMORY_STEPS):
        trainer.train_step(*batch)
    sync(device)
    peak = peak_memory(device)
    print(MEMORY_TAG + json.dumps({"mode": args.memory_child, "baseline_mib": baseline, "peak_mib": peak}), flush=True)


def measure_memory(argv: Sequence[str]) -> dict[str, dict[str, float]]:
    """Peak memory of each training mode, each in its own fresh process (run side by side)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-m", "kdseg.bench", *argv, "--memory-child", mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for mode in TRAIN_MODES
    }
    out = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith(MEMORY_TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory measurement of '{mode}' failed (exit {proc.returncode}):\n{stderr[-STDERR_TAIL:]}")
        record = json.loads(lines[-1][len(MEMORY_TAG):])
        out[mode] = {"peak_mib": record["peak_mib"], "above_baseline_mib": record["peak_mib"] - record["baseline_mib"]}
    return out


# ---------------------------------------------------------------- ablations

def ablation_switches(cfg: DictConfig, device: torch.device, with_compile: bool) -> list[tuple[str, Any]]:
    """(trainer key, flipped value) for each speed switch that matters on this device."""
    tr = cfg.trainer
    amp_on = amp_policy(tr.amp, device)[0] is not None
    switches: list[tuple[str, Any]] = [
        ("channels_last", not auto_flag(tr.channels_last, device)),
        ("amp", "off" if amp_on else "bf16"),
    ]
    if device.type == "cuda":
        benchmark = not tr.deterministic if tr.cudnn_benchmark == "auto" else tr.cudnn_benchmark
        switches.append(("cudnn_benchmark", not benchmark))
    elif (tr.num_threads or DEFAULT_THREADS) > 1:
        switches.append(("num_threads", 1))
    if with_compile:
        switches.append(("compile", not tr.compile))
    return switches


def with_trainer_key(cfg: DictConfig, key: str, value: Any) -> DictConfig:
    """A copy of ``cfg`` with one trainer switch changed."""
    return OmegaConf.merge(cfg, {"trainer": {key: value}})


def run_ablations(
    args: argparse.Namespace, cfg: DictConfig, device: torch.device, loaders: tuple[DataLoader, DataLoader],
    trainers: dict[str, Trainer], batch: tuple[torch.Tensor, torch.Tensor], t_loader: float,
) -> list[dict[str, Any]]:
    """Each row: a switch, its default and flipped value, and time(flipped) / time(default)."""
    rows = []
    default = trainers["distill"]
    for key, value in ablation_switches(cfg, device, args.compile):
        variant = build_trainer(with_trainer_key(cfg, key, value), "distill", device, loaders)
        t = round_robin(
            {"default": (default, lambda: default.train_step(*batch)), "variant": (variant, lambda: variant.train_step(*batch))},
            device, args.warmup, args.iterations, args.repeats,
        )
        rows.append({"what": "distillation step", "switch": f"trainer.{key}", "default": resolved(default, key),
                     "variant": resolved(variant, key), "ratio": t["variant"] / t["default"]})
        del variant
    loader_variants = [("num_workers", 0), ("persistent_workers", not cfg.trainer.persistent_workers)]
    if device.type == "cuda":
        loader_variants.append(("pin_memory", not auto_flag(cfg.trainer.pin_memory, device)))
    for key, value in loader_variants:
        if key == "persistent_workers" and cfg.trainer.num_workers == 0:
            continue
        variant_loader, _ = make_loaders(cfg, device, **{key: value})
        t_variant = loader_seconds_per_batch(variant_loader, args.warmup, args.repeats)
        rows.append({"what": "data loader", "switch": f"trainer.{key}", "default": _shown(cfg.trainer[key]),
                     "variant": _shown(value), "ratio": t_variant / t_loader})
    rows.append(confusion_matrix_ablation(args, cfg, device))
    return rows


def confusion_matrix_ablation(args: argparse.Namespace, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """``ConfusionMatrix.update`` with eager label checks (a host sync per update) vs deferred ones."""
    k = cfg.dataset.num_classes
    target = torch.randint(0, k, (args.batch, args.crop, args.crop), device=device)
    pred = torch.randint(0, k, (args.batch, args.crop, args.crop), device=device)
    calls = {}
    for name, eager in (("eager", True), ("deferred", False)):
        matrix = ConfusionMatrix(k, eager_checks=eager, device=device)
        calls[name] = (None, lambda m=matrix: m.update(pred, target))
    t = round_robin(calls, device, args.warmup, 4 * args.iterations, args.repeats)
    default = "eager" if device.type == "cpu" else "deferred"  # eager_checks=None
    variant = "deferred" if default == "eager" else "eager"
    return {"what": "confusion matrix update", "switch": "label checks", "default": default,
            "variant": variant, "ratio": t[variant] / t[default]}


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def resolved(trainer: Trainer, key: str) -> str:
    """A trainer switch as configured, with what ``auto`` / ``null`` turned into on this device."""
    value = trainer.cfg[key]
    effective = {
        "channels_last": trainer.memory_format == torch.channels_last,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
        "num_threads": value or DEFAULT_THREADS,
        "cudnn_benchmark": value if value != "auto" else not trainer.cfg.deterministic,
    }.get(key, value)
    shown, eff = _shown(value), _shown(effective)
    return shown if shown == eff else f"{shown} ({eff})"


# ---------------------------------------------------------------- report

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(x: float, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:,.{digits}f}"


def describe_machine(device: torch.device) -> str:
    """GPU name, or CPU model and counts; torch and Python versions."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        where = f"{model}, {os.cpu_count()} logical CPUs, {DEFAULT_THREADS} torch threads by default"
    return f"{where}; torch {torch.__version__}, python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    cfg = bench_config(args)
    device = resolve_device(cfg.trainer.device)
    configure_backends(cfg.trainer, device)  # the process-wide switches, as a task sets them when it starts
    loaders = make_loaders(cfg, device)
    trainers = {mode: build_trainer(cfg, mode, device, loaders) for mode in (("student", "distill") if args.students else TRAIN_MODES)}
    batch = random_batch(args.batch, args.crop, cfg.dataset.num_classes, device)
    tr = cfg.trainer
    amp_dtype = trainers["distill"].amp_dtype
    print(f"kdseg bench: teacher {args.teacher}, student {args.student}, crop {args.crop}, batch {args.batch}, device {device}")
    print(f"machine: {describe_machine(device)}")
    print(
        f"switches: amp={str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}, "
        f"channels_last={trainers['distill'].memory_format == torch.channels_last}, "
        f"cudnn_benchmark={torch.backends.cudnn.benchmark if device.type == 'cuda' else '-'}, compile={tr.compile}, "
        f"num_workers={tr.num_workers}, pin_memory={auto_flag(tr.pin_memory, device)}, persistent_workers={tr.persistent_workers}"
    )
    print(f"timing: {args.warmup} warm-up calls, then the median of {args.repeats} repeats of {args.iterations} calls\n", flush=True)
    if args.students is not None:
        result = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "memory_child")} | {"device": str(device)},
                  "machine": describe_machine(device), "fused": bench_fused(args, cfg, device, loaders, trainers, batch)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
        return result

    t = round_robin(step_calls(trainers, batch), device, args.warmup, args.iterations, args.repeats)
    t["loader"] = loader_seconds_per_batch(loaders[0], args.warmup, args.repeats)
    t_eval_img = eval_seconds_per_image(trainers["distill"], loaders[1], args.warmup, args.repeats)
    memory = {} if args.no_memory else measure_memory(argv)
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "memory_child")} | {"device": str(device)},
        "machine": describe_machine(device),
        "img_s": {name: args.batch / sec for name, sec in t.items()} | {"eval": 1 / t_eval_img},
        "ms_per_batch": {name: 1000 * sec for name, sec in t.items()},
        "memory_mib": memory,
    }
    result["ratios"] = ratios(t)
    if memory:
        result["ratios"]["memory_ratio"] = memory["distill"]["above_baseline_mib"] / memory["reference"]["above_baseline_mib"]
        result["ratios"]["memory_ratio_absolute"] = memory["distill"]["peak_mib"] / memory["reference"]["peak_mib"]

    mem_unit = "allocated" if device.type == "cuda" else "RSS"
    rows = []
    for name in ("teacher", *TRAIN_MODES, "loader", "eval"):
        label = LABELS[name] + (f" ({tr.num_workers} workers)" if name == "loader" else "")
        ms = _f(1000 * t[name]) if name in t else "-"
        mem = memory.get(name, {})
        rows.append([label, _f(result["img_s"][name]), ms, _f(mem.get("peak_mib")), _f(mem.get("above_baseline_mib"))])
    print(markdown_table(["measurement", "img/s", "ms/batch", f"peak {mem_unit} (MiB)", "above baseline (MiB)"], rows))
    r = result["ratios"]
    print(f"\noverhead = t(distill step) / (t(student step) + t(teacher inference)) = {r['overhead']:.3f}")
    print(f"speedup_vs_reference = t(reference step) / t(distill step) = {r['speedup_vs_reference']:.3f}")
    print(f"loader_headroom = loader img/s / distill-step img/s = {r['loader_headroom']:.2f}")
    if memory:
        print(f"memory_ratio = distill / reference peak memory above baseline = {r['memory_ratio']:.3f} "
              f"(absolute peaks: {r['memory_ratio_absolute']:.3f})")
    print(flush=True)

    crops = [int(c) for c in args.scaling_crops.split(",") if c.strip()]
    batches = [int(b) for b in args.scaling_batches.split(",") if b.strip()]
    result["scaling"] = []
    for crop in crops:
        for b in batches:
            ts = round_robin(
                step_calls(trainers, random_batch(b, crop, cfg.dataset.num_classes, device)),
                device, 1, args.scaling_iterations, args.scaling_repeats,
            )
            result["scaling"].append({"crop": crop, "batch": b, "img_s": {n: b / s for n, s in ts.items()}} | ratios(ts))
    if result["scaling"]:
        print("scaling (img/s; overhead and speedup_vs_reference per cell):")
        print(markdown_table(
            ["crop", "batch", "teacher", "student", "distill", "reference", "overhead", "speedup_vs_reference"],
            [[s["crop"], s["batch"], *(_f(s["img_s"][n]) for n in ("teacher", *TRAIN_MODES)),
              f"{s['overhead']:.3f}", f"{s['speedup_vs_reference']:.3f}"] for s in result["scaling"]],
        ))
        print(flush=True)

    result["ablations"] = [] if args.no_ablations else run_ablations(args, cfg, device, loaders, trainers, batch, t["loader"])
    if result["ablations"]:
        print("ablations (one switch flipped; ratio = time with the variant / time with the default, > 1: the default is faster):")
        print(markdown_table(
            ["what", "switch", "default", "variant", "ratio"],
            [[a["what"], a["switch"], a["default"], a["variant"], f"{a['ratio']:.3f}"] for a in result["ablations"]],
        ))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
