"""Checkpoints: the state dict, the model config that rebuilds it, and the metrics it reached.

Written atomically (temporary file, fsync, rename), optionally keeping the replaced file as
``<name>.prev.pt`` so a damaged latest checkpoint still leaves a good one. Read with
``torch.load(weights_only=True)``, so a checkpoint never runs code when loaded; a file that
is missing, truncated, not a checkpoint or full of pickled objects is a one-line
:class:`~kdseg.errors.CheckpointError` that says which.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import zipfile
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from kdseg.errors import CheckpointError, DiskFullError, MissingCheckpointError
from kdseg.models import DEFAULT_ARCH, build_model
from kdseg.utils import not_a_file

MODEL_KEYS = ("encoder_name", "classes", "encoder_weights", "output_stride", "arch", "options")
MODEL_DEFAULTS = {"arch": DEFAULT_ARCH, "options": {}}
"""What a model config (or a checkpoint written before ``arch`` existed) that lacks these keys means."""
ZIP_MAGIC = b"PK\x03\x04"
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""A write that failed for lack of room: a full disk, a quota, a file-size limit (``ulimit -f``)."""
TORCH_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|failed writing", re.IGNORECASE)
"""How torch's zip writer reports a failed write (its RuntimeError hides the OSError, kept as context)."""


def model_config(cfg: Any) -> dict:
    """The plain-dict part of a model config that ``build_model`` needs (``arch``, ``options`` defaulted)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return {key: plain.get(key, MODEL_DEFAULTS.get(key)) for key in MODEL_KEYS}


def checkpoint_model(ckpt: dict) -> dict:
    """A checkpoint's model config, with :data:`MODEL_DEFAULTS` for keys it predates (old files are DeepLabV3+)."""
    return MODEL_DEFAULTS | ckpt["model"]


class Upload(str, Enum):
    """``logger.log_checkpoints``: which checkpoints a run copies into MLflow (the run folder keeps them all)."""

    student = "student"  # best_student.pt: the best epoch's student weights and model config only
    all = "all"  # best.pt and last.pt: full training states (optimizer, terms, RNG), as in the run folder
    none = "none"


def save_student(path: str | os.PathLike, ckpt: dict) -> Path:
    """The student alone from a training checkpoint ``ckpt``: its weights and the model config that
    rebuilds them, nothing else (no optimizer state, no distillation adapters, no metrics).
    :func:`load_model` and ``torch.load(weights_only=True)`` read it. Its pages stay cached: it is
    written to be uploaded (read) at once."""
    model = {key: ckpt["model"][key] for key in MODEL_KEYS if key in ckpt["model"]}
    return save_checkpoint(path, keep_cached=True, state_dict=ckpt["state_dict"], model=model)


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the file it replaced: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, keep_previous: bool = False, same_as: str | os.PathLike | None = None,
                    keep_cached: bool = False, **content: Any) -> Path:
    """``torch.save`` to a temporary sibling, fsync, then rename over ``path``.

    A kill at any moment leaves either the old or the new file, never a partial one. With
    ``keep_previous`` the replaced file becomes :func:`previous_path` first. A full disk (or a
    quota, or a file-size limit) is a :class:`DiskFullError` naming the file, the free space and
    the size needed; the temporary file is removed and the previous checkpoint left as it was.

    ``same_as``: an already written checkpoint with exactly this content (``content`` is then not
    given): ``path`` becomes a hard link to it (a copy where the file system has no hard links).
    Checkpoints are only ever replaced by renaming, never written in place, so the two names stay
    independent: replacing one later leaves the other as it was.

    Once on disk, the file's pages are dropped from the page cache (unless ``keep_cached``): a
    training state is written to be resumed from, rarely read back, and a run writes one per epoch;
    left cached, every new one grows the cache, which on a busy machine makes each write slower
    (about 0.2 s instead of 0.1 s for a ResNet-18's 100 MB here, :func:`_drop_cached`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        if same_as is not None:
            _link_or_copy(Path(same_as), tmp)
        else:
            with open(tmp, "wb") as f:
                torch.save(content, f)
                f.flush()
                os.fsync(f.fileno())
                if not keep_cached:
                    _drop_cached(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if not _out_of_space(err):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0  # (removed by the finally clause)
        raise DiskFullError(_no_space_message(path, written, err)) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _drop_cached(fd: int) -> None:
    """Ask the kernel to drop an fsynced file's pages from the page cache (a hint: a no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``, or a synced copy of it where links are not possible."""
    try:
        os.link(source, target)
    except OSError as err:
        if _out_of_space(err):
            raise
        with open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())


def _out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` (or an exception it was raised from or during) is a write that found no room."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            return True
        if isinstance(err, RuntimeError) and TORCH_WRITE_FAILED.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _size(n: int) -> str:
    """Bytes in MiB (or KiB below one MiB), for a message."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _no_space_message(path: Path, written: int, err: BaseException) -> str:
    """One line: the file, why, the free space, the size needed, what is left and how to go on."""
    reason = next((os.strerror(e.errno) for e in (err, err.__context__, err.__cause__)
                   if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS), "no space left")
    if path.exists():  # the checkpoint it would replace: about the size of the new one
        need, kept = f"about {_size(max(written, path.stat().st_size))}", f"the previous '{path}' is intact"
    else:
        need, kept = f"more than the {_size(written)} written", "nothing was left half-written"
    return (f"cannot write checkpoint '{path}': {reason} ({_size(shutil.disk_usage(path.parent).free)} free there, "
            f"{need} needed); {kept}. Free space (or raise the quota) and run the same command again: "
            "it resumes from the last checkpoint")


def _inside(folder: Path) -> str:
    """``, e.g. '<folder>/last.pt'`` naming the checkpoints a folder holds (none: empty)."""
    found = sorted(p.name for p in folder.glob("*.pt") if p.is_file() and ".prev" not in p.name)
    return f", e.g. '{folder / found[0]}' of {', '.join(found)} there" if found else ""


def _diagnose(path: Path, err: Exception) -> str:
    """What is wrong with a file that ``torch.load(weights_only=True)`` could not read."""
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds Python objects or code{what} that safe loading (weights_only=True) refuses; "
                "kdseg never runs code from a checkpoint")
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            return f"the file is truncated ({size} bytes, the end of its zip archive is missing)"
        return f"the file is corrupt ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
    return "it is not a PyTorch checkpoint file"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a kdseg checkpoint safely; a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a file (expected a checkpoint file{_inside(path)})")
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint '{path}' {not_a_file(path)} (expected a checkpoint file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, OSError, KeyError, UnpicklingError ...
        raise CheckpointError(f"'{path}' is not a readable kdseg checkpoint: {_diagnose(path, err)}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"'{path}' is not a kdseg checkpoint (expected a dict with 'state_dict' and 'model')")
    return ckpt


def check_model(path: str | os.PathLike, ckpt: dict, expect: dict) -> None:
    """Raise a one-line CheckpointError if the checkpoint's model config differs from ``expect``."""
    model = checkpoint_model(ckpt)
    bad = {key: value for key, value in expect.items() if model.get(key) != value}
    if bad:
        have = ", ".join(f"{key}={model.get(key)!r}" for key in bad)
        need = ", ".join(f"{key}={value!r}" for key, value in bad.items())
        raise CheckpointError(f"checkpoint '{path}' has {have}, but this run needs {need}")


def load_model(path: str | os.PathLike, expect: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights.

    ``expect`` (e.g. ``{"classes": 21}``) is checked against the checkpoint's model config
    first, so a mismatch is one line instead of a state-dict size error.
    """
    ckpt = load_checkpoint(path)
    check_model(path, ckpt, expect or {})
    model = build_model(**{k: v for k, v in checkpoint_model(ckpt).items() if k in MODEL_KEYS} | {"encoder_weights": None})
    load_weights(path, model, ckpt)
    return model, ckpt


def load_weights(path: str | os.PathLike, model: nn.Module, ckpt: dict) -> None:
    """``model.load_state_dict`` with a one-line error when the weights belong to another model."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint '{path}' does not match its model config {ckpt['model']}: {str(err).splitlines()[0]}"
        ) from err
