"""Profiling a model's real-time figures: parameters, forward FLOPs, latency and frames per second.

The figures a real-time segmentation paper reports for its student: the parameter count,
the compute of one forward pass, and the speed of one image at a time (batch 1, eval mode,
no autograd) on a given device. FLOPs come from PyTorch's own counter
(:class:`torch.utils.flop_counter.FlopCounterMode`), not a hand-written one.

A model's speed is a property of its architecture, input size and device, not of the run that
trained it, and the host's load only ever slows it down. So the latency is the minimum over
rounds of a median (:func:`stable_latency`), measured once per model config, size, device and
torch version and cached under ``<paths.cache_dir>/speed/`` (:func:`cached_model_stats`, a file
lock keeps parallel jobs from measuring it twice): every run of one architecture logs the same
figures.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdseg.errors import ConfigError
from kdseg.models import count_params, input_multiple
from kdseg.utils import digest

STABLE_WITHIN = 0.02
"""A round of latency passes that lowers the minimum by less than this fraction ends the measurement."""
SPEED_KEY_CHARS = 12
"""Hex digits of a speed cache entry's key in its file name."""


def check_input_size(model: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` as ints, or a ConfigError naming the size the model cannot take."""
    try:
        height, width = (int(side) for side in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"input size must be (height, width), got {input_size!r}") from None
    if height < 1 or width < 1:
        raise ConfigError(f"input size must be positive, got {height}x{width}")
    multiple = input_multiple(model)
    if height % multiple or width % multiple:
        raise ConfigError(
            f"input size {height}x{width} does not fit {type(model).__name__}: height and width must be "
            f"multiples of {multiple} (its encoder's output stride), e.g. "
            f"{-(-height // multiple) * multiple}x{-(-width // multiple) * multiple}"
        )
    return height, width


@contextmanager
def eval_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` in eval mode on ``device``; its train/eval mode and device are restored on exit."""
    modes = {module: module.training for module in model.modules()}
    first = next(model.parameters(), None)
    home = first.device if first is not None else None
    model.to(device).eval()
    try:
        yield model
    finally:
        if home is not None:
            model.to(home)
        for module, training in modes.items():
            module.training = training


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``model(x)`` as counted by :class:`~torch.utils.flop_counter.FlopCounterMode`.

    A multiply-add counts as 2 FLOPs (a convolution is ``2 * Cout * Cin/groups * k*k * Hout*Wout``
    per image, a linear layer ``2 * in * out`` per row). Only ops with a registered formula are
    counted: convolutions, matrix products and attention; bias additions, normalisation,
    activations, pooling and interpolation are not (a few % of a CNN's total). Papers that
    report "FLOPs" as multiply-adds (MACs) give half this figure.
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def measure_latency(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``model(x)`` over ``repeats`` timed passes after ``warmup`` untimed ones.

    On CUDA the device is synchronised before and after each timed pass, so a time covers the
    kernels and not only their launch.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    cuda = x.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def stable_latency(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3, rounds: int = 1) -> tuple[float, int]:
    """The minimum over up to ``rounds`` rounds of :func:`measure_latency`'s median, and how many rounds ran.

    Load on the host only adds time, so the fastest round is the closest to the model's own
    speed; rounds stop early once one lowers the minimum by less than :data:`STABLE_WITHIN`.
    Only the first round has the ``warmup`` passes.
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    best = measure_latency(model, x, repeats, warmup)
    done = 1
    while done < rounds:
        latency = measure_latency(model, x, repeats, 0)
        done += 1
        stable = latency > best * (1 - STABLE_WITHIN)
        best = min(best, latency)
        if stable:
            break
    return best, done


def model_stats(
    model: nn.Module,
    input_size: tuple[int, int],
    device: torch.device | str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
    channels: int = 3,
    rounds: int = 1,
) -> dict[str, float]:
    """A model's real-time figures at batch 1 and ``input_size`` = (height, width) on ``device``.

    Returns ``params_m`` (parameters, millions), ``gflops`` (forward GFLOPs of one image,
    multiply-add = 2 FLOPs, see :func:`count_flops`), ``latency_ms`` (median forward time,
    :func:`measure_latency`, eval mode, ``torch.inference_mode``, fp32; the minimum of
    ``rounds`` such medians, :func:`stable_latency`) and ``fps`` (``1000 / latency_ms``).
    The model is left in the mode and on the device it came in. An input size the model
    cannot take is a ConfigError before anything runs.
    """
    height, width = check_input_size(model, input_size)
    device = torch.device(device)
    x = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0)).to(device)  # global RNG untouched
    with eval_on(model, device):
        flops = count_flops(model, x)
        latency_ms, _ = stable_latency(model, x, repeats, warmup, rounds)
    return {
        "params_m": count_params(model) / 1e6,
        "gflops": flops / 1e9,
        "latency_ms": latency_ms,
        "fps": 1000.0 / latency_ms,
    }


def device_label(device: torch.device | str) -> str:
    """The hardware a speed figure belongs to: the GPU's name, or the CPU's model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{device.type} ({name}, {torch.get_num_threads()} threads)"


def speed_key(
    model_config: dict[str, Any], input_size: tuple[int, int], device: torch.device | str, method: dict[str, int]
) -> dict[str, Any]:
    """What decides a model's real-time figures: its config, the input size, the hardware, torch's version and how it is timed."""
    return {"model": model_config, "size": [int(side) for side in input_size], "device": device_label(device),
            "torch": torch.__version__, "method": method}


def cached_model_stats(
    model: nn.Module,
    model_config: dict[str, Any],
    input_size: tuple[int, int],
    device: torch.device | str,
    cache_dir: str | os.PathLike,
    repeats: int = 20,
    warmup: int = 3,
    rounds: int = 5,
) -> tuple[dict[str, float], Path]:
    """:func:`model_stats` of ``model`` (built from ``model_config``), measured once per :func:`speed_key`.

    The first job to need a key measures it and writes ``<cache_dir>/speed/<encoder>-<h>x<w>-<key>.json``
    (under a file lock); every later job reads the same figures. Returns the figures and that file.
    """
    key = speed_key(model_config, input_size, device, {"repeats": repeats, "warmup": warmup, "rounds": rounds})
    name = f"{model_config.get('encoder_name', 'model')}-{key['size'][0]}x{key['size'][1]}-{digest(key, SPEED_KEY_CHARS)}.json"
    path = Path(cache_dir) / "speed" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        try:
            return json.loads(path.read_text())["stats"], path
        except (OSError, ValueError, KeyError):
            pass  # not measured yet (or an unreadable entry): measure it
        stats = model_stats(model, input_size, device, repeats, warmup, rounds=rounds)
        entry = {"key": key, "stats": stats, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return stats, path


def stats_metrics(stats: dict[str, float], prefix: str = "student") -> dict[str, float]:
    """:func:`model_stats` under MLflow ``split/name`` names.

    ``params/<prefix>_m`` (the name kdseg already logs the parameter count under, as a param),
    ``speed/<prefix>_gflops``, ``speed/<prefix>_latency_ms`` and ``speed/<prefix>_fps``.
    """
    return {
        f"params/{prefix}_m": stats["params_m"],
        f"speed/{prefix}_gflops": stats["gflops"],
        f"speed/{prefix}_latency_ms": stats["latency_ms"],
        f"speed/{prefix}_fps": stats["fps"],
    }
