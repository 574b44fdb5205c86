"""Export a checkpoint's model for deployment: ``python -m kdseg.export checkpoint=PATH [key=value ...]``.

Keys: ``checkpoint`` (required), ``out`` (folder, default: the checkpoint's), ``height`` and
``width`` (default: the crop the run trained on, else 512), ``dynamic`` (``false``, the default:
height and width fixed; ``true``: any multiples of the model's input multiple), ``opset``
(default: torch's), ``atol`` (default 1e-4). Writes, for ``best.pt``:

- ``best_student.pt``: the model's weights and the model config that rebuilds them, nothing
  else (no optimizer state, no distillation adapters); a kdseg checkpoint that
  ``kdseg.checkpoint.load_model`` and ``torch.load(weights_only=True)`` read;
- ``best.onnx``: the model in eval mode (input ``image``: N x 3 x H x W, output ``logits``:
  N x classes x H x W, N dynamic), from torch's ``torch.export``-based ("dynamo") exporter, the
  default since torch 2.9 (the TorchScript one is deprecated). With ``dynamic=false`` H and W are
  ``height`` and ``width``, fixed in the file (onnxruntime refuses any other size). With
  ``dynamic=true`` they are the named axes ``height`` and ``width``: torch.export traces them as
  multiples of :func:`kdseg.models.input_multiple` (16 for a DeepLabV3+, 32 for a SegFormer or
  UPerNet), so an image of any such size runs, e.g. at the camera's resolution padded up to
  multiples (ONNX itself cannot state the multiple: a file given another size fails or is wrong).
  Adaptive average pooling (the pyramid pooling of PSPNet and UPerNet) is written for any
  size: torch's own decomposition would fix its bins at the traced size.

The ONNX file is only kept if onnxruntime (CPU) reproduces the PyTorch model, rebuilt from
``best_student.pt``, within ``atol`` on batches of 1 and 3 random images (the export traces a
batch of 2, so both exercise the dynamic batch axis): at ``height`` x ``width``, and with
``dynamic=true`` also at a second size of another aspect (:func:`verify_sizes`).
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
from kdseg.errors import ConfigError, ExportError, one_line, reported
from kdseg.models import count_params, input_multiple
from kdseg.profile import check_input_size
from kdseg.utils import not_a_folder_to_be

DEFAULT_SIZE = 512
MIN_OPSET = 18  # the dynamo exporter's lowest; it silently writes 18 when asked for less
TRACE_BATCH = 2  # torch.export specialises a dimension of size 1, so trace with 2
VERIFY_BATCHES = (1, 3)
BOOLS = {"true": True, "false": False}


def _bool(text: str) -> bool:
    try:
        return BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(text) from None


KEYS = {"checkpoint": str, "out": str, "height": int, "width": int, "dynamic": _bool, "opset": int, "atol": float}
EXPECTED = {int: "an integer", float: "a number", _bool: "true or false"}
USAGE = ("usage: python -m kdseg.export checkpoint=PATH [out=DIR] [height=H] [width=W] [dynamic=false|true] "
         "[opset=N] [atol=1e-4]")


def export_size(ckpt: dict, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """``(height, width)``: each side as given, else the run's training crop (``dataset.crop_size``), else 512."""
    crop = ckpt.get("config", {}).get("dataset.crop_size") or DEFAULT_SIZE
    return (int(crop) if height is None else height, int(crop) if width is None else width)


def _check_options(opset: int | None, atol: float, dynamic: bool = False) -> None:
    if not isinstance(dynamic, bool):
        raise ConfigError(f"dynamic={dynamic!r}: expected true (height and width dynamic) or false (fixed at height x width)")
    latest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= latest:
        raise ConfigError(f"opset={opset} is out of range: torch's ONNX exporter writes opsets {MIN_OPSET} to {latest}")
    if not atol > 0:
        raise ConfigError(f"atol must be > 0, got {atol}")


def _images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Reproducible N(0, 1) images, about the range of ImageNet-normalised inputs."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def verify_sizes(height: int, width: int, multiple: int, dynamic: bool) -> list[tuple[int, int]]:
    """The ``(height, width)`` sizes onnxruntime is checked at: the export size, and for a dynamic
    export also one ``multiple`` taller and two wider (another aspect, both sides changed)."""
    return [(height, width), (height + multiple, width + 2 * multiple)] if dynamic else [(height, width)]


def _adaptive_avg_pool2d(x: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` for any input size: PyTorch's bins (bin ``i`` of ``n`` covers
    ``[floor(i n / s), ceil((i + 1) n / s))``) as an averaging matrix built from the size at run time.

    torch's own decomposition branches in Python on the traced size, which fixes the bins in a
    graph with dynamic height and width (onnxruntime then fails or is wrong at other sizes)."""
    if tuple(output_size) == (1, 1):
        return x.mean((-2, -1), keepdim=True)
    for axis, out in zip((-2, -1), output_size):
        n = x.shape[axis]
        edges = torch.arange(0, (out + 1) * n, n, device=x.device)  # i * n, i = 0..out
        j = torch.arange(n, device=x.device)
        inside = ((j[None] + 1) * out > edges[:-1, None]) & (j[None] * out < edges[1:, None])  # floor(i n/s) <= j < ceil((i+1) n/s)
        weights = inside.to(x.dtype)
        weights = weights / weights.sum(1, keepdim=True)
        x = torch.matmul(weights, x) if axis == -2 else torch.matmul(x, weights.transpose(0, 1))
    return x


ANY_SIZE_DECOMPOSITIONS = {
    torch.ops.aten.adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
    torch.ops.aten._adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
}


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an error message (torch's go on for pages)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _dynamic_program(model: nn.Module, height: int, width: int) -> torch.export.ExportedProgram:
    """``model`` traced by ``torch.export`` with dynamic batch, height and width (multiples of its input multiple).

    Traced at ``height`` x ``width``, each side at least two multiples (torch.export specialises a
    dimension of size 1, as for the batch). Called directly rather than through ``torch.onnx.export``,
    whose capture retries with torch's suggested fixes when a dimension cannot stay dynamic (which
    can fix it without saying so); here that is an :class:`ExportError`."""
    multiple = input_multiple(model)
    dims = {0: torch.export.Dim("batch"), 2: multiple * torch.export.Dim("height_blocks", min=1),
            3: multiple * torch.export.Dim("width_blocks", min=1)}
    trace = (max(height, 2 * multiple), max(width, 2 * multiple))
    try:
        program = torch.export.export(model, (_images(TRACE_BATCH, *trace, seed=0),), dynamic_shapes=(dims,),
                                      strict=False)
    except Exception as err:  # torch's UserError (constraint violations) and tracing errors; the model works at fixed sizes
        raise ExportError(
            f"torch.export cannot keep height and width dynamic (multiples of {multiple}) for {type(model).__name__}: "
            f"{_first_line(err)} (export with dynamic=false for a fixed size)"
        ) from err
    if any(node.target in ANY_SIZE_DECOMPOSITIONS and list(node.args[1]) != [1, 1] for node in program.graph.nodes):
        program = program.run_decompositions(ANY_SIZE_DECOMPOSITIONS)  # a pass of its own (seconds): only where needed
    return program


def _write_onnx(model: nn.Module, path: Path, height: int, width: int, opset: int | None, dynamic: bool = False) -> int:
    """Export ``model`` with a dynamic batch axis (and dynamic height and width if ``dynamic``) to
    ``path``; returns the opset the file has."""
    args = (_images(TRACE_BATCH, height, width, seed=0),)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    if dynamic:
        program = torch.onnx.export(_dynamic_program(model, height, width), args, dynamo=True, verbose=False,
                                    opset_version=opset, **names)
        image = program.model.graph.inputs[0].shape  # torch's symbols (s0, 16*s1, ...) -> the names the docstring promises
        program.rename_axes({image[0]: "batch", image[2]: "height", image[3]: "width"})
        program.save(str(path), external_data=False)
    else:
        torch.onnx.export(
            model, args, str(path), dynamo=True, external_data=False, verbose=False, opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},), **names,
        )
    written = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise ExportError(f"torch's ONNX exporter could not convert the model to opset {opset} (it wrote {written}); try another opset")
    return written


def max_abs_diff(onnx_path: str | os.PathLike, model: nn.Module, sizes: Sequence[tuple[int, int]]) -> float:
    """Largest |onnxruntime - PyTorch| over the logits of :data:`VERIFY_BATCHES` random batches at each
    ``(height, width)`` of ``sizes``; an input onnxruntime cannot run is an :class:`ExportError` naming it."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    diffs = []
    with torch.inference_mode():
        for height, width in sizes:
            for batch in VERIFY_BATCHES:
                x = _images(batch, height, width, seed=batch)
                try:
                    got = session.run(None, {name: x.numpy()})[0]
                except Exception as err:  # onnxruntime's own error types (InvalidArgument, Fail, ...)
                    raise ExportError(
                        f"onnxruntime cannot run the exported model on {batch} x 3 x {height} x {width}: {one_line(err)}"
                    ) from None
                want = model(x).numpy()
                if got.shape != want.shape:
                    raise ExportError(f"onnxruntime returns logits of shape {got.shape} for {batch} x 3 x {height} x {width}, "
                                      f"PyTorch {tuple(want.shape)}")
                diffs.append(np.abs(got - want).max())
    return float(np.max(diffs))  # NaN propagates (Python's max would drop it)


def _sizes_text(sizes: Sequence[tuple[int, int]]) -> str:
    return " and ".join(f"{h}x{w}" for h, w in sizes)


def export(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    height: int | None = None,
    width: int | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    dynamic: bool = False,
) -> dict[str, Any]:
    """Write ``<stem>_student.pt`` and a verified ``<stem>.onnx`` of a checkpoint's model (module docstring).

    Returns the two paths (``student``, ``onnx``), ``height``, ``width`` (the export size),
    ``dynamic``, ``multiple`` (the model's input multiple), ``verified`` (the sizes onnxruntime was
    checked at), ``opset``, ``classes``, ``params_m``, ``max_abs_diff`` and ``atol``. Bad options, a
    missing or foreign checkpoint and a size the model cannot take are errors before anything is
    written. The ``.pt`` is written first; an ONNX file that onnxruntime cannot run or that misses
    ``atol`` is not kept and raises :class:`~kdseg.errors.ExportError`.
    """
    _check_options(opset, atol, dynamic)
    checkpoint = Path(checkpoint)
    model, ckpt = load_model(checkpoint)
    height, width = check_input_size(model, export_size(ckpt, height, width))
    multiple = input_multiple(model)
    sizes = verify_sizes(height, width, multiple, dynamic)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent
    stem = checkpoint.stem
    student_path = save_student(out_dir / f"{stem}_student.pt", ckpt)
    reference, _ = load_model(student_path)
    onnx_path = out_dir / f"{stem}.onnx"
    tmp = out_dir / f".{stem}.tmp{os.getpid()}.onnx"
    kept = "no ONNX file was kept"
    try:
        written = _write_onnx(model.eval(), tmp, height, width, opset, dynamic)
        try:
            diff = max_abs_diff(tmp, reference.eval(), sizes)
        except ExportError as err:
            raise ExportError(f"{err} ('{checkpoint}', {'dynamic' if dynamic else 'fixed'} height and width); {kept}") from None
        if not diff <= atol:
            raise ExportError(
                f"onnxruntime and PyTorch differ by up to {diff:.3g} on '{checkpoint}' at {_sizes_text(sizes)} "
                f"(atol={atol:g}); {kept} (pass atol= to accept a larger difference)"
            )
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "student": student_path,
        "onnx": onnx_path,
        "height": height,
        "width": width,
        "dynamic": dynamic,
        "multiple": multiple,
        "verified": sizes,
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
            raise ConfigError(f"{key} must be {EXPECTED[KEYS[key]]}, got '{text}'") from None
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
    h, w, classes = result["height"], result["width"], result["classes"]
    if result["dynamic"]:
        shape = (f"image N x 3 x H x W -> logits N x {classes} x H x W; H and W dynamic: any multiples of "
                 f"{result['multiple']}, exported at {h} x {w}")
    else:
        shape = f"image N x 3 x {h} x {w} -> logits N x {classes} x {h} x {w}; H and W fixed"
    print(f"wrote {result['student']} (weights + model config, {result['params_m']:.2f} M parameters)")
    print(f"wrote {result['onnx']} (opset {result['opset']}; {shape})")
    batches = " and ".join(str(b) for b in VERIFY_BATCHES)
    sizes = " and ".join(f"{sh} x {sw}" for sh, sw in result["verified"])
    print(f"onnxruntime vs PyTorch on batches of {batches} images at {sizes}: "
          f"max abs diff {result['max_abs_diff']:.3g} (atol {result['atol']:g})")


if __name__ == "__main__":
    main()
