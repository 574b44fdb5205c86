"""Checkpoints: the state dict, the model config that rebuilds it, and the metrics it reached.

Written atomically (temporary file + rename) and read with ``torch.load(weights_only=True)``,
so a checkpoint never runs code when loaded.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdseg.models import build_model

MODEL_KEYS = ("encoder_name", "classes", "encoder_weights", "output_stride")


def model_config(cfg: Any) -> dict:
    """The plain-dict part of a model config that ``build_model`` needs."""
    return {key: cfg[key] for key in MODEL_KEYS}


def save_checkpoint(path: str | os.PathLike, **content: Any) -> Path:
    """``torch.save`` to a temporary sibling, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(content, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a kdseg checkpoint safely; a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"'{path}' is not a readable kdseg checkpoint (truncated, corrupt, or it holds code/objects "
            f"that weights_only loading refuses): {first}"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise ValueError(f"'{path}' is not a kdseg checkpoint (expected a dict with 'state_dict' and 'model')")
    return ckpt


def load_model(path: str | os.PathLike, expect: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights.

    ``expect`` (e.g. ``{"classes": 21}``) is checked against the checkpoint's model config
    first, so a mismatch is one line instead of a state-dict size error.
    """
    ckpt = load_checkpoint(path)
    for key, value in (expect or {}).items():
        if ckpt["model"].get(key) != value:
            raise ValueError(f"checkpoint '{path}' has {key}={ckpt['model'].get(key)!r}, but this run needs {key}={value!r}")
    model = build_model(**{k: v for k, v in ckpt["model"].items() if k in MODEL_KEYS} | {"encoder_weights": None})
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint '{path}' does not match its model config {ckpt['model']}: {str(err).splitlines()[0]}") from err
    return model, ckpt
