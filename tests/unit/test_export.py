"""kdseg.export: the student-only .pt, the ONNX file (dynamic batch, fixed or dynamic height and width,
checked by onnxruntime) and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kdseg.export as kexport
from kdseg.checkpoint import load_model, save_checkpoint
from kdseg.errors import ConfigError, ExportError
from kdseg.models import build_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"encoder_name": "resnet18", "classes": 21, "encoder_weights": None, "output_stride": 16}
SIZE = 64
PSPNET = {"arch": "PSPNet", "encoder_name": "resnet18", "classes": 5, "encoder_weights": None, "output_stride": None,
          "options": {"encoder_depth": 3, "psp_out_channels": 32}}
"""A small model (input multiple 8) whose pyramid pooling torch's own decomposition would fix at the traced size."""


def write_checkpoint(path: Path, model_config: dict = MODEL, **extra) -> torch.nn.Module:
    """A training-style checkpoint: the student plus adapters, optimizer state and run config that must not be exported."""
    torch.manual_seed(0)
    model = build_model(**model_config).eval()
    save_checkpoint(
        path,
        state_dict=model.state_dict(),
        model=model_config,
        metrics={},
        terms={"fitnet": {"adapter.weight": torch.randn(8, 4, 1, 1)}},
        optimizer={"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        **extra,
    )
    return model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    env.pop("KDSEG_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "kdseg.export", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, dict]:
    """One API export at 64x64 into a separate folder."""
    root = tmp_path_factory.mktemp("export")
    model = write_checkpoint(root / "run" / "best.pt")
    return model, kexport.export(root / "run" / "best.pt", root / "out", height=SIZE, width=SIZE)


def test_student_pt_holds_only_the_model(exported):
    model, result = exported
    assert result["student"] == result["student"].parent / "best_student.pt"
    assert result["student"].parent.name == "out"
    saved = torch.load(result["student"], weights_only=True)
    assert set(saved) == {"state_dict", "model"}  # no terms, optimizer, metrics
    assert saved["model"] == MODEL
    assert list(saved["state_dict"]) == list(model.state_dict())
    assert not any("adapter" in key for key in saved["state_dict"])
    rebuilt, _ = load_model(result["student"])
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch_for_any_batch(exported, batch):
    model, result = exported
    assert result["onnx"].name == "best.onnx" and result["max_abs_diff"] <= 1e-4
    proto = onnx.load(str(result["onnx"]))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    session = ort.InferenceSession(str(result["onnx"]), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(10 + batch))
    got = session.run(["logits"], {"image": x.numpy()})[0]
    with torch.inference_mode():
        want = model(x).numpy()
    assert got.shape == (batch, 21, SIZE, SIZE)
    assert np.abs(got - want).max() <= 1e-4


def test_a_fixed_export_has_int_height_and_width_and_refuses_another_size(exported):
    _, result = exported
    assert result["dynamic"] is False and result["verified"] == [(SIZE, SIZE)]
    dims = onnx.load(str(result["onnx"])).graph.input[0].type.tensor_type.shape.dim
    assert [(d.dim_value, d.dim_param) for d in dims[2:]] == [(SIZE, ""), (SIZE, "")]
    session = ort.InferenceSession(str(result["onnx"]), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=f"Got: 128 Expected: {SIZE}"):
        session.run(["logits"], {"image": np.zeros((1, 3, 128, 96), np.float32)})


def test_no_temporary_files_are_left(exported):
    _, result = exported
    assert sorted(p.name for p in result["onnx"].parent.iterdir()) == ["best.onnx", "best_student.pt"]


def test_cli_writes_next_to_the_checkpoint_at_its_training_crop(tmp_path):
    write_checkpoint(tmp_path / "last.pt", config={"dataset.crop_size": SIZE})
    proc = run_cli(f"checkpoint={tmp_path / 'last.pt'}", "opset=18")
    assert proc.returncode == 0, proc.stderr
    assert "max abs diff" in proc.stdout and f"N x 21 x {SIZE} x {SIZE}" in proc.stdout
    diff = float(proc.stdout.split("max abs diff ")[1].split()[0])
    assert 0 <= diff <= 1e-4
    proto = onnx.load(str(tmp_path / "last.onnx"))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [18]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, SIZE, SIZE]
    assert (tmp_path / "last_student.pt").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["checkpoint=x.pt", "size=64"], "error: unknown key 'size'"),
        (["checkpoint=does/not/exist.pt"], "error: checkpoint 'does/not/exist.pt' does not exist"),
        (["checkpoint=x.pt", "dynamic=maybe"], "error: dynamic must be true or false, got 'maybe'"),
    ],
)
def test_cli_bad_arguments_are_one_error_line(args, message, monkeypatch, capsys):
    """In process (the subprocess round trip is test_cli_writes_next_to_the_checkpoint_at_its_training_crop's):
    ``SystemExit`` with a one-line message is what Python prints to stderr with exit code 1."""
    monkeypatch.delenv("KDSEG_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        kexport.main(args)
    text = exit_info.value.code
    assert isinstance(text, str) and text.startswith(message)
    assert text.splitlines() == [text]
    assert capsys.readouterr().out == ""


def test_a_mismatch_beyond_atol_keeps_no_onnx_file(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "best.pt")
    monkeypatch.setattr(kexport, "_write_onnx", lambda model, path, *args: path.write_bytes(b"onnx") and 20)
    monkeypatch.setattr(kexport, "max_abs_diff", lambda *args: 1e-3)
    with pytest.raises(ExportError, match=r"differ by up to 0.001 .* 64x64 \(atol=0.0001\)"):
        kexport.export(tmp_path / "best.pt", height=SIZE, width=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best_student.pt"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 72}, r"input size 72x64 .* multiples of 16"),
        ({"opset": 17}, r"opset=17 is out of range: .* 18 to"),
        ({"atol": 0.0}, "atol must be > 0"),
        ({"dynamic": "yes"}, r"^dynamic='yes': expected true \(height and width dynamic\) or false"),
        ({"width": 40, "dynamic": True}, r"input size 64x40 .* multiples of 16"),
    ],
)
def test_bad_options_fail_before_anything_is_written(tmp_path, kwargs, message):
    write_checkpoint(tmp_path / "best.pt")
    with pytest.raises(ConfigError, match=message):
        kexport.export(tmp_path / "best.pt", **({"height": SIZE, "width": SIZE} | kwargs))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_export_size_defaults():
    assert kexport.export_size({}) == (512, 512)
    assert kexport.export_size({"config": {"dataset.crop_size": 320}}) == (320, 320)
    assert kexport.export_size({"config": {"dataset.crop_size": 320}}, height=256) == (256, 320)
    assert kexport.export_size({}, height=0, width=64) == (0, 64)  # explicit values are kept (and then checked)


def test_parse_args():
    assert kexport.parse_args(["checkpoint=a.pt", "out=o", "height=64", "width=96", "opset=20", "atol=1e-3"]) == {
        "checkpoint": "a.pt", "out_dir": "o", "height": 64, "width": 96, "opset": 20, "atol": 1e-3,
    }
    assert kexport.parse_args(["checkpoint=a.pt", "dynamic=true"])["dynamic"] is True
    assert kexport.parse_args(["checkpoint=a.pt", "dynamic=False"])["dynamic"] is False
    with pytest.raises(ConfigError, match="^dynamic must be true or false, got '1'$"):
        kexport.parse_args(["checkpoint=a.pt", "dynamic=1"])
    with pytest.raises(ConfigError, match="expected key=value, got 'a.pt'"):
        kexport.parse_args(["a.pt"])
    with pytest.raises(ConfigError, match="height must be an integer, got 'big'"):
        kexport.parse_args(["checkpoint=a.pt", "height=big"])
    with pytest.raises(ConfigError, match="missing checkpoint=PATH"):
        kexport.parse_args(["height=64"])


def test_a_nan_difference_is_not_hidden(tmp_path):
    class NanAt3(torch.nn.Module):
        """Finite logits for a batch of 1, NaN in the batch of 3."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.shape[0] == 1 else x * float("nan")

    onnx_path = tmp_path / "identity.onnx"
    torch.onnx.export(torch.nn.Identity().eval(), (torch.zeros(2, 3, 8, 8),), str(onnx_path), dynamo=True,
                      external_data=False, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert kexport.max_abs_diff(onnx_path, torch.nn.Identity(), [(8, 8)]) == 0.0
    assert np.isnan(kexport.max_abs_diff(onnx_path, NanAt3(), [(8, 8)]))
    # a size the file cannot take is an error naming it, not an onnxruntime traceback
    with pytest.raises(ExportError, match=r"^onnxruntime cannot run the exported model on 1 x 3 x 16 x 24: .*Got: 16 Expected: 8"):
        kexport.max_abs_diff(onnx_path, torch.nn.Identity(), [(8, 8), (16, 24)])


def test_out_that_is_a_file_is_one_error_line_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=rf"^out='{tmp_path}/file' is a file: expected a folder for the exported files"):
        kexport.parse_args(["checkpoint=x.pt", f"out={tmp_path}/file"])
    with pytest.raises(ConfigError, match=rf"^out='{tmp_path}/file/onnx' lies under the file '{tmp_path}/file'"):
        kexport.parse_args(["checkpoint=x.pt", f"out={tmp_path}/file/onnx"])
    assert kexport.parse_args(["checkpoint=x.pt", f"out={tmp_path}/new"])["out_dir"] == f"{tmp_path}/new"


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory) -> tuple[torch.nn.Module, dict]:
    """One dynamic export of the small PSPNet at 32x48 (its input multiple is 8)."""
    root = tmp_path_factory.mktemp("dynamic")
    model = write_checkpoint(root / "best.pt", PSPNET)
    return model, kexport.export(root / "best.pt", height=32, width=48, dynamic=True)


def test_a_dynamic_export_names_symbolic_height_and_width(dynamic_export):
    _, result = dynamic_export
    assert result["dynamic"] is True and result["multiple"] == 8
    assert result["verified"] == [(32, 48), (40, 64)] and result["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(result["onnx"])).graph
    for value, channels in ((graph.input[0], 3), (graph.output[0], 5)):
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
        assert [d.dim_value for d in dims] == [0, channels, 0, 0]
    assert sorted(p.name for p in result["onnx"].parent.iterdir()) == ["best.onnx", "best.pt", "best_student.pt"]


@pytest.mark.parametrize("batch, height, width", [(1, 40, 72), (3, 64, 64), (2, 8, 24)])
def test_a_dynamic_export_matches_pytorch_at_other_sizes(dynamic_export, batch, height, width):
    """Sizes other than the traced 32x48 (a non-square one with 5 x 9 blocks, which the pyramid's
    2, 3 and 6 bins do not divide, and one block high) and other batches."""
    model, result = dynamic_export
    session = ort.InferenceSession(str(result["onnx"]), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height + width))
    got = session.run(["logits"], {"image": x.numpy()})[0]
    with torch.inference_mode():
        want = model(x).numpy()
    assert got.shape == (batch, 5, height, width)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("size", [1, 2, 5, 7, 8, 13])
def test_any_size_adaptive_pooling_is_pytorchs(size):
    x = torch.randn(2, 3, size, size + 3, generator=torch.Generator().manual_seed(size))
    for out in [(1, 1), (2, 2), (3, 3), (6, 6), (2, 5)]:
        assert torch.allclose(kexport._adaptive_avg_pool2d(x, out), torch.nn.functional.adaptive_avg_pool2d(x, out), atol=1e-6)


def test_verify_sizes():
    assert kexport.verify_sizes(64, 64, 16, dynamic=False) == [(64, 64)]
    assert kexport.verify_sizes(64, 64, 16, dynamic=True) == [(64, 64), (80, 96)]


def test_a_dynamic_onnx_file_of_a_model_without_pyramid_pooling(tmp_path):
    """The path without the any-size pooling pass (a DeepLabV3+'s: test_cli_dynamic_export_runs_a_deeplab_at_another_size)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()
    assert kexport._write_onnx(model, tmp_path / "toy.onnx", 16, 16, None, True) >= kexport.MIN_OPSET
    graph = onnx.load(str(tmp_path / "toy.onnx")).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 2, "height", "width"]
    assert kexport.max_abs_diff(tmp_path / "toy.onnx", model, [(16, 16), (5, 7)]) <= 1e-5


def test_a_model_that_fixes_its_size_is_one_error_line():
    class FixedSize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.shape[2] == 32 else x

    with pytest.raises(ExportError, match=r"^torch.export cannot keep height and width dynamic \(multiples of 1\) for FixedSize: "
                                          r".* \(export with dynamic=false for a fixed size\)$") as info:
        kexport._dynamic_program(FixedSize(), 32, 32)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.slow
def test_cli_dynamic_export_runs_a_deeplab_at_another_size(tmp_path):
    """The default architecture (DeepLabV3+, input multiple 16) from the command line: traced at the
    64x64 crop, run at a camera-like 128 x 96."""
    model = write_checkpoint(tmp_path / "best.pt", config={"dataset.crop_size": SIZE})
    proc = run_cli(f"checkpoint={tmp_path / 'best.pt'}", "dynamic=true")
    assert proc.returncode == 0, proc.stderr
    assert "image N x 3 x H x W -> logits N x 21 x H x W; H and W dynamic: any multiples of 16, exported at 64 x 64" in proc.stdout
    assert "at 64 x 64 and 80 x 96: max abs diff" in proc.stdout
    session = ort.InferenceSession(str(tmp_path / "best.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert np.abs(session.run(["logits"], {"image": x.numpy()})[0] - model(x).numpy()).max() <= 1e-4
