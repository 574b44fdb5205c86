"""kdseg.export: the student-only .pt, the ONNX file (dynamic batch, checked by onnxruntime) and the CLI."""
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


def write_checkpoint(path: Path, **extra) -> torch.nn.Module:
    """A training-style checkpoint: the student plus adapters, optimizer state and run config that must not be exported."""
    torch.manual_seed(0)
    model = build_model("resnet18", classes=21).eval()
    save_checkpoint(
        path,
        state_dict=model.state_dict(),
        model=MODEL,
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
    assert kexport.max_abs_diff(onnx_path, torch.nn.Identity(), 8, 8) == 0.0
    assert np.isnan(kexport.max_abs_diff(onnx_path, NanAt3(), 8, 8))


def test_out_that_is_a_file_is_one_error_line_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=rf"^out='{tmp_path}/file' is a file: expected a folder for the exported files"):
        kexport.parse_args(["checkpoint=x.pt", f"out={tmp_path}/file"])
    with pytest.raises(ConfigError, match=rf"^out='{tmp_path}/file/onnx' lies under the file '{tmp_path}/file'"):
        kexport.parse_args(["checkpoint=x.pt", f"out={tmp_path}/file/onnx"])
    assert kexport.parse_args(["checkpoint=x.pt", f"out={tmp_path}/new"])["out_dir"] == f"{tmp_path}/new"
