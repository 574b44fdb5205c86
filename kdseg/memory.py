"""Memory in use and at its peak, on CUDA (allocated by torch) or on the CPU (resident set size).

On Linux the CPU peak is the process's ``VmHWM``, which :func:`reset_peak_memory` resets
(``/proc/self/clear_refs``), so one process that runs several jobs (a sequential sweep)
measures each job's own peak; elsewhere it falls back to ``ru_maxrss`` (never reset).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

MIB = 2**20


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_memory(device: torch.device) -> float:
    """MiB in use now: CUDA allocated, or the resident set size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    rss = _proc_status_kib("VmRSS")
    return rss / 1024 if rss is not None else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's peak statistics, or (Linux) the process's resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process


def peak_memory(device: torch.device) -> float:
    """MiB at the peak: CUDA max allocated, or the peak resident set size of this process image."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource  # Unix only, and only needed where /proc is missing (macOS)

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB
