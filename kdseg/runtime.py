"""The process's runtime: device, mixed precision, process-wide backend switches, seeds and RNG state.

A leaf module (of kdseg it imports only the leaves :mod:`kdseg.errors` and :mod:`kdseg.utils`), so the trainer,
the DDP plumbing, resuming and the benchmark can all use it without importing each other.
"""
from __future__ import annotations

import hashlib
import random
from enum import Enum
from typing import Any

import numpy as np
import torch

from kdseg.errors import ConfigError
from kdseg.utils import choice


class Amp(str, Enum):
    """``trainer.amp``: mixed precision of the forward pass."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for an unavailable CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device} but CUDA is not available here; use trainer.device=auto or cpu")
    return dev


def amp_policy(amp: str | Amp, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for ``trainer.amp``.

    ``auto`` is bf16 on CUDA devices that support it, fp16 on older CUDA devices, off on CPU.
    Only fp16 needs loss scaling.
    """
    amp = choice(Amp, amp, "trainer.amp")
    if amp is Amp.off or (amp is Amp.auto and device.type != "cuda"):
        return None, False
    if amp is Amp.auto:
        amp = Amp.bf16 if torch.cuda.is_bf16_supported() else Amp.fp16
    dtype = torch.bfloat16 if amp is Amp.bf16 else torch.float16
    return dtype, dtype == torch.float16


def auto_flag(value: bool | str, device: torch.device) -> bool:
    """A ``true | false | auto`` switch; ``auto`` is on for CUDA devices only."""
    return value is True or (value == "auto" and device.type == "cuda")


def configure_backends(cfg: Any, device: torch.device) -> None:
    """Process-wide speed switches of the ``trainer`` config: CPU threads, cuDNN autotuning and determinism (CUDA).

    Called once when a task starts (and by the benchmark for each configuration it times), never
    by a Trainer: these flags belong to the process, not to one model. ``cudnn_benchmark: auto``
    autotunes the convolution algorithms for each input shape unless ``deterministic`` asks for
    bitwise-repeatable cuDNN kernels.
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = bool(cfg.deterministic)
        benchmark = cfg.cudnn_benchmark
        torch.backends.cudnn.benchmark = not cfg.deterministic if benchmark == "auto" else bool(benchmark)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) and DataLoader generator states, as weights_only-safe values."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [kind, torch.from_numpy(np_keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def rng_digest() -> str:
    """A hash of the process's Python, NumPy and torch (CPU and CUDA) random states: equal states, equal digests."""
    state = rng_state()
    h = hashlib.sha256()
    h.update(repr(state["python"]).encode())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    h.update(repr((kind, pos, has_gauss, cached)).encode())
    for tensor in (keys, state["torch"], *state["cuda"]):
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])
