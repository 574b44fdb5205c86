"""Export a checkpoint's model for deployment: ``python -m kdseg.export checkpoint=PATH [key=value ...]``.

Keys: ``checkpoint`` (required), ``out`` (folder, default: the checkpoint's), ``height`` and
``width`` (default: the crop the run trained on, else 512), ``opset`` (default: torch's),
``atol`` (default 1e-4). Writes, for ``best.pt``:

- ``best_student.pt``: the model's weights and the model config that rebuilds them, nothing
  else (no optimizer state, no distillation adapters); a kdseg checkpoint that
  ``kdseg.checkpoint.load_model`` and ``torch.load(weights_only=True)`` read;
- ``best.onnx``: the model in eval mode (input ``image``: N x 3 x height x width, output
  ``logits``: N x classes x height x width, N dynamic), from torch's ``torch.export``-based
  ("dynamo") exporter, the default since torch 2.9 (the TorchScript one is deprecated).

The ONNX file is only kept if onnxruntime (CPU) reproduces the PyTorch model, rebuilt from
``best_student.pt``, within ``atol`` on batches of 1 and 3 random images (the export traces a
batch of 2, so both exercise the dynamic batch axis). Spatial sizes are fixed at export.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kdseg.checkpoint import load_model, save_student
from kdseg.errors import ConfigError, ExportError, reported
from kdseg.models import count_params
from kdseg.profile import check_input_size
from kdseg.utils import not_a_folder_to_be

DEFAULT_SIZE = 512
MIN_OPSET = 18  # the dynamo exporter's lowest; it silently writes 18 when asked for less
TRACE_BATCH = 2  # torch.export specialises a dimension of size 1, so trace with 2
VERIFY_BATCHES = (1, 3)
KEYS = {"checkpoint": str, "out": str, "height": int, "width": int, "opset": int, "atol": float}
USAGE = "usage: python -m kdseg.export checkpoint=PATH [out=DIR] [height=H] [width=W] [opset=N] [atol=1e-4]"


def export_size(ckpt: dict, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """``(height, width)``: each side as given, else the run's training crop (``dataset.crop_size``), else 512."""
    crop = ckpt.get("config", {}).get("dataset.crop_size") or DEFAULT_SIZE
    return (int(crop) if height is None else height, int(crop) if width is None else width)


def _check_options(opset: int | None, atol: float) -> None:
    latest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= latest:
        raise ConfigError(f"opset={opset} is out of range: torch's ONNX exporter writes opsets {MIN_OPSET} to {latest}")
    if not atol > 0:
        raise ConfigError(f"atol must be > 0, got {atol}")


def _images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Reproducible N(0, 1) images, about the range of ImageNet-normalised inputs."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _write_onnx(model: nn.Module, path: Path, height: int, width: int, opset: int | None) -> int:
    """Export ``model`` with a dynamic batch axis to ``path``; returns the opset the file has."""
    torch.onnx.export(
        model, (_images(TRACE_BATCH, height, width, seed=0),), str(path),
        dynamo=True, external_data=False, verbose=False, opset_version=opset,
        input_names=["image"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    written = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise ExportError(f"torch's ONNX exporter could not convert the model to opset {opset} (it wrote {written}); try another opset")
    return written


def max_abs_diff(onnx_path: str | os.PathLike, model: nn.Module, height: int, width: int) -> float:
    """Largest |onnxruntime - PyTorch| over the logits of :data:`VERIFY_BATCHES` random batches."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    diffs = []
    with torch.inference_mode():
        for batch in VERIFY_BATCHES:
            x = _images(batch, height, width, seed=batch)
            got = session.run(None, {name: x.numpy()})[0]
            diffs.append(np.abs(got - model(x).numpy()).max())
    return float(np.max(diffs))  # NaN propagates (Python's max would drop it)


def export(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    height: int | None = None,
    width: int | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Write ``<stem>_student.pt`` and a verified ``<stem>.onnx`` of a checkpoint's model (module docstring).

    Returns the two paths (``student``, ``onnx``), ``height``, ``width``, ``opset``, ``classes``,
    ``params_m``, ``max_abs_diff`` and ``atol``. Bad options, a missing or foreign checkpoint and
    a size the model cannot take are errors before anything is written. The ``.pt`` is written
    first; an ONNX file that misses ``atol`` is not kept and raises :class:`~kdseg.errors.ExportError`.
    """
    _check_options(opset, atol)
    checkpoint = Path(checkpoint)
    model, ckpt = load_model(checkpoint)
    height, width = check_input_size(model, export_size(ckpt, height, width))
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent
    stem = checkpoint.stem
    student_path = save_student(out_dir / f"{stem}_student.pt", ckpt)
    reference, _ = load_model(student_path)
    onnx_path = out_dir / f"{stem}.onnx"
    tmp = out_dir / f".{stem}.tmp{os.getpid()}.onnx"
    try:
        written = _write_onnx(model.eval(), tmp, height, width, opset)
        diff = max_abs_diff(tmp, reference.eval(), height, width)
        if not diff <= atol:
            raise ExportError(
                f"onnxruntime and PyTorch differ by up to {diff:.3g} on '{checkpoint}' at {height}x{width} "
                f"(atol={atol:g}); no ONNX file was kept (pass atol= to accept a larger difference)"
            )
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "student": student_path,
        "onnx": onnx_path,
        "height": height,
        "width": width,
        "opset": written,
        "classes": int(ckpt["model"]["classes"]),
        "params_m": count_params(model) / 1e6,
        "max_abs_diff": diff,
        "atol": atol,
    }


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments -> :func:`export` keyword arguments; a ConfigError names a bad one."""
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got '{arg}'. {USAGE}")
        if key not in KEYS:
            raise ConfigError(f"unknown key '{key}' (expected one of: {', '.join(KEYS)}). {USAGE}")
        try:
            values[key] = KEYS[key](text)
        except ValueError:
            raise ConfigError(f"{key} must be {'an integer' if KEYS[key] is int else 'a number'}, got '{text}'") from None
    if not values.get("checkpoint"):
        raise ConfigError(f"missing checkpoint=PATH. {USAGE}")
    if "out" in values:
        problem = not_a_folder_to_be(values["out"])
        if problem is not None:
            raise ConfigError(f"out='{values['out']}' {problem}: expected a folder for the exported files (created if missing)")
        values["out_dir"] = values.pop("out")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"{USAGE}\n\n{__doc__}")
        return
    with reported():
        result = export(**parse_args(argv))
    h, w = result["height"], result["width"]
    print(f"wrote {result['student']} (weights + model config, {result['params_m']:.2f} M parameters)")
    print(f"wrote {result['onnx']} (opset {result['opset']}; image N x 3 x {h} x {w} -> logits N x {result['classes']} x {h} x {w})")
    batches = " and ".join(str(b) for b in VERIFY_BATCHES)
    print(f"onnxruntime vs PyTorch on batches of {batches} images: max abs diff {result['max_abs_diff']:.3g} (atol {result['atol']:g})")


if __name__ == "__main__":
    main()
