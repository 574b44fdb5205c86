"""One smoke run per new student option: it trains against the cached DeepLabV3+ teacher, logs
its terms and val mIoU, is evaluated with ``task=eval`` (whole and multi-scale + flip) and exports
to an ONNX file that onnxruntime reproduces."""
from __future__ import annotations

import math

import pytest

from kdseg.checkpoint import load_checkpoint
from kdseg.export import export
from kdseg.models import build_model
from kdseg.tasks import run

from tests.e2e.test_run import mlflow_run

NEW_STUDENTS = {"deeplabv3_resnet18": "DeepLabV3", "deeplabv3_mobilenet_v2": "DeepLabV3", "pspnet_resnet18": "PSPNet",
                "segformer_b0": "Segformer", "upernet_resnet18": "UPerNet"}


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(NEW_STUDENTS))
def test_new_student_trains_evaluates_and_exports(make_cfg, tmp_path, option):
    name = f"e2e-arch-{option}"
    miou = run(make_cfg(f"student={option}", "loss=[pi_pa,kd]", f"logger.run_name={name}"))
    ckpt = load_checkpoint(tmp_path / "out" / "best.pt")
    assert ckpt["model"]["arch"] == NEW_STUDENTS[option]
    _, mrun = mlflow_run(make_cfg(), name)
    assert {"train/loss_pi", "train/loss_pa", "train/loss_kd", "val/miou", "speed/student_fps"} <= set(mrun.data.metrics)
    assert math.isclose(mrun.data.metrics["val/miou"], miou)
    evaluated = {mode: run(make_cfg("task=eval", f"checkpoint={tmp_path / 'out' / 'last.pt'}", f"student={option}",
                                    f"eval={mode}", f"paths.output_dir={tmp_path}/eval-{mode}")) for mode in ("whole", "ms_flip")}
    assert math.isclose(evaluated["whole"], miou, rel_tol=1e-6, abs_tol=1e-9)  # the training's own val pass
    assert 0.0 <= evaluated["ms_flip"] <= 1.0  # views at 0.5 ... 1.75 x 64 px, padded to the model's multiple
    result = export(tmp_path / "out" / "best.pt", out_dir=tmp_path / "export")
    assert result["onnx"].is_file() and result["max_abs_diff"] <= result["atol"]


@pytest.mark.slow
def test_a_pretrained_smp_teacher_replaces_the_cached_one(make_cfg, tmp_path):
    """``teacher.pretrained=<folder>``: the saved SegFormer is the teacher (no teacher is trained or cached)."""
    saved = tmp_path / "segformer"
    build_model("mit_b0", 21, arch="Segformer", output_stride=None).save_pretrained(saved)
    cfg = make_cfg("student=pspnet_resnet18", "loss=kd", f"teacher.pretrained={saved}", "logger.run_name=e2e-pretrained",
                   f"paths.cache_dir={tmp_path}/cache")
    run(cfg)
    _, mrun = mlflow_run(cfg, "e2e-pretrained")
    assert mrun.data.params["teacher_checkpoint"] == str(saved) and mrun.data.tags["teacher"] == str(saved)
    assert "train/loss_kd" in mrun.data.metrics
    assert not (tmp_path / "cache" / "teachers").exists()
