"""Config errors met by a run (a term that cannot be computed, a tap that does not exist, a teacher checkpoint
of another model) stop it before any work; run.py's command line (loss sums, --cfg job)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kdseg.config import ConfigError

from ..conftest import ROOT

BASELINES = {"kd": 1, "cwd": 3, "at": 10000, "fitnet": 1, "dist": 1, "ifvd": 200}
"""Each baseline's option switches on its own term at its reference weight."""


def test_loss_sum_on_the_command_line_is_a_list_of_options():
    from kdseg.cli import expand_loss_sums

    argv = ["run.py", "loss=kd+cwd", "-m", "loss=none,kd+cwd", "loss=[kd,at]", "trainer.x=a+b", "loss=kd"]
    assert expand_loss_sums(argv) == ["run.py", "loss=[kd,cwd]", "-m", "loss=[none],[kd,cwd]", "loss=[kd,at]", "trainer.x=a+b", "loss=kd"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "loss=kd+cwd", "--cfg", "job"], capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    weights = re.findall(r"^    (\w+):\n(?:      .*\n)*?      weight: (\S+)$", out, flags=re.M)
    assert dict(weights) | {"pi": "0", "pa": "0"} == {
        "pi": "0", "pa": "0", "kd": "1", "cwd": "3", "at": "0", "fitnet": "0", "dist": "0", "ifvd": "0",
        "dkd": "0", "aicsd": "0", "bpkd": "0", "cirkd": "0", "afdcd": "0",
    }


def test_cfg_job_prints_resolved_pi_lambda():
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "student=resnet18", "loss.pi_lambda=100", "--cfg", "job"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    loss_section = out.split("\nloss:\n", 1)[1].split("\ntrainer:", 1)[0]
    assert "  pi_lambda: 100\n" in loss_section


def test_term_that_cannot_be_computed_at_the_crop_is_a_config_error_before_any_work(make_cfg, tmp_path):
    """A 16 px crop gives a 1x1 encoder map: pa's kernel floor(0.5) = 0; found by the probe pass."""
    from kdseg.tasks import run

    with pytest.raises(ConfigError, match=r"loss\.terms\.pa cannot be computed for 16x16 inputs \(dataset\.crop_size\): .*1x1 is too small"):
        run(make_cfg("dataset.crop_size=16"))
    assert not (tmp_path / "out").exists()


def test_unknown_tap_is_a_config_error_with_close_matches(make_cfg, tmp_path):
    from kdseg.tasks import run

    with pytest.raises(ConfigError, match=r"tap module path 'decoder.block3.1' not found in DeepLabV3Plus.*close matches: decoder.block2.1"):
        run(make_cfg("loss.terms.pi.tap=decoder.block3.1"))
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize(
    "model, message",
    [
        ({"classes": 19}, "has classes=19, but this run needs classes=21"),
        ({"encoder_name": "resnet50"}, "has encoder_name='resnet50', but this run needs encoder_name='resnet101'"),
    ],
)
def test_teacher_checkpoint_of_other_classes_or_architecture_is_refused(make_cfg, tmp_path, model, message):
    from kdseg.checkpoint import save_checkpoint
    from kdseg.errors import CheckpointError
    from kdseg.tasks import run

    config = {"encoder_name": "resnet101", "classes": 21, "encoder_weights": None, "output_stride": 16} | model
    path = save_checkpoint(tmp_path / "teacher.pt", state_dict={}, model=config)
    with pytest.raises(CheckpointError, match=message):
        run(make_cfg(f"teacher.checkpoint={path}"))
    assert not (tmp_path / "out" / "run.json").exists()
