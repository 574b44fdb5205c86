"""User-facing errors: one ``KdsegError`` family, reported as one ``error: ...`` line.

Everything a user can fix (a config value, a data file, a checkpoint, the tracking store)
raises a subclass of :class:`KdsegError` whose message names the thing to fix. Entry
points wrap their work in :func:`reported` so such an error ends the process with that
one line and exit code 1; ``KDSEG_DEBUG=1`` shows the full traceback instead. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager


class KdsegError(Exception):
    """A problem the user can fix; its message says what and where."""


class ConfigError(KdsegError, ValueError):
    """A config value is missing, mistyped, out of range or inconsistent with another."""


class DataError(KdsegError, ValueError):
    """A dataset file is missing, unreadable or inconsistent (the message names the file)."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset folder, split list, image or mask does not exist."""


class CheckpointError(KdsegError, ValueError):
    """A checkpoint is missing, truncated, not a kdseg checkpoint, or of another model."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint file does not exist."""


class ResumeError(KdsegError):
    """An interrupted run cannot be resumed as asked."""


class NonFiniteLossError(KdsegError, FloatingPointError):
    """A loss term became NaN or infinite during training."""


class DiskFullError(KdsegError, OSError):
    """A file could not be written: the disk is full, or a quota or file-size limit was reached."""


class DeviceMemoryError(KdsegError, MemoryError):
    """The accelerator ran out of memory for the configured batch and crop."""


class TrainingInterrupted(KdsegError):
    """Training stopped on a signal (SIGTERM, SIGUSR1) after writing a checkpoint; the same command continues it."""


class TrackingError(KdsegError, RuntimeError):
    """The MLflow tracking store cannot be used."""


class ExportError(KdsegError, RuntimeError):
    """An exported model does not reproduce the PyTorch model (or not at the opset asked for)."""


def debug_enabled() -> bool:
    """``KDSEG_DEBUG`` set to anything but empty / 0 / false shows tracebacks."""
    return os.environ.get("KDSEG_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(err: BaseException) -> str:
    """The error's message on one line.

    An exception re-raised from a DataLoader worker carries the worker's traceback in its
    message; only its last line (the original message) is kept.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^(?:\w+\.)*\w*(?:Error|Exception)\w*: ", "", text.splitlines()[-1])
    return " ".join(text.split()) or type(err).__name__


@contextmanager
def reported() -> Iterator[None]:
    """Turn a :class:`KdsegError` into ``SystemExit("error: ...")`` (exit code 1, no traceback)."""
    try:
        yield
    except KdsegError as err:
        if debug_enabled():
            raise
        raise SystemExit(f"error: {one_line(err)}") from None
