"""Multiruns: sweep ids, the summary file and MLflow run, ``python -m kdseg.report``, and every sweep in both forms
(``sweep=X`` and ``--config-dir sweeps --config-name X``)."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from ..conftest import ROOT, SMOKE

SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml"))
FORMS = {"group": lambda sweep: [f"sweep={sweep}"], "file": lambda sweep: ["--config-dir", str(ROOT / "sweeps"), "--config-name", sweep]}
"""The two ways to pick a sweep: its config group option, or its file in sweeps/ as the primary config."""


def multirun(tmp_path: Path, session_dir: Path, *args: str, default_uri: bool = False, env: dict | None = None) -> tuple[str, Path]:
    """Run a smoke multirun in tmp_path; ``default_uri`` keeps the config's own tracking URI
    (``mlflow.db`` in the directory the user runs from) instead of passing one."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        sys.executable, str(ROOT / "run.py"), "-m", *args, *SMOKE,
        f"paths.data_dir={session_dir}/data", f"paths.cache_dir={session_dir}/cache",
        f"hydra.sweep.dir={tmp_path}/multirun", *([] if default_uri else [f"logger.tracking_uri={uri}"]),
    ]
    env = {k: v for k, v in (env or os.environ).items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return uri, tmp_path / "multirun"


def test_seed_sweep_summary_matches_child_runs(tmp_path, session_dir):
    uri, sweep_dir = multirun(tmp_path, session_dir, "seed=0,1", "loss=none,pi")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdseg")
    children = client.search_runs([exp.experiment_id], "tags.task = 'distill'")
    assert len(children) == 4
    sweep_ids = {r.data.tags["sweep_id"] for r in children}
    assert len(sweep_ids) == 1 and sweep_ids != {""}
    (sweep_id,) = sweep_ids

    # the real-time figures: columns of the summary, from the runs' speed/* metrics
    header = (sweep_dir / "summary.md").read_text().splitlines()[0]
    assert header.endswith("| params (M) | GFLOPs | FPS |")
    gflops = {f"{r.data.metrics['speed/student_gflops']:.2f}" for r in children}
    assert len(gflops) == 1 and f"| 12.3 | {gflops.pop()} |" in (sweep_dir / "summary.md").read_text()
    csv_rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 3
    md = (sweep_dir / "summary.md").read_text()
    for loss in ("none", "pi"):
        values = [r.data.metrics["val/miou"] for r in children if r.data.tags["loss"] == loss]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in md
        assert any(f"{mean!r}" in row or f"{mean}" in row for row in csv_rows)

    summaries = client.search_runs([exp.experiment_id], f"tags.task = 'summary' and tags.sweep_id = '{sweep_id}'")
    assert len(summaries) == 1
    artifacts = {a.path for a in client.list_artifacts(summaries[0].info.run_id)}
    assert {"summary.md", "summary.csv"} <= artifacts

    report = subprocess.run(
        [sys.executable, "-m", "kdseg.report", "--tracking-uri", uri, "--sweep-id", sweep_id, "--per-class"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert report.startswith(md) and "min wall time" in md
    assert "| background |" in report


def composed(*args: str) -> tuple[dict, dict]:
    """The job config and the sweeper's parameters that ``run.py *args`` composes (``--cfg``: nothing runs)."""
    out = [subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "--cfg", part], capture_output=True, text=True,
                          check=True, cwd=ROOT, timeout=300).stdout for part in ("job", "hydra")]
    params = OmegaConf.create(out[1]).hydra.sweeper.get("params")
    return OmegaConf.to_container(OmegaConf.create(out[0])), OmegaConf.to_container(params) if params is not None else None


def test_sweeps_are_a_config_group_and_files_with_one_source_each():
    """sweeps/X.yaml composes exactly what sweep=X does, and holds no parameters of its own."""
    assert SWEEPS == sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")) == [
        "cirkd_table", "cross_arch", "paper_table", "seeds", "tune", "zoo"]
    for sweep in SWEEPS:
        group, file = (composed(*FORMS[form](sweep)) for form in ("group", "file"))
        assert group == file, sweep
        own = OmegaConf.load(ROOT / "conf" / "sweep" / f"{sweep}.yaml").hydra.sweeper.get("params")  # tune: from the command line
        assert group[1] == (OmegaConf.to_container(own) if own is not None else None)
        assert "params" not in (ROOT / "sweeps" / f"{sweep}.yaml").read_text()
    assert composed("sweep=paper_table")[1] == {"student": "resnet18,mobilenet_v2", "loss": "none,pi,pa,pi_pa", "seed": "0,1,2"}
    assert composed("sweep=cross_arch")[1] == {
        "student": "deeplabv3_resnet18,pspnet_resnet18,segformer_b0", "loss": "none,pi_pa,cwd", "seed": "0,1,2"}


def test_cirkd_table_runs_under_a_preset():
    """CIRKD's Cityscapes grid (3 students x none, cwd, ifvd, kd + cirkd x 3 seeds) under experiment=cirkd_cityscapes:
    the preset's dataset, teacher and recipe, the sweep's grid (in either form)."""
    grid = {"student": "deeplabv3_resnet18,deeplabv3_mobilenet_v2,pspnet_resnet18", "loss": "none,cwd,ifvd,[kd,cirkd]",
            "seed": "0,1,2"}
    for form in FORMS.values():
        job, params = composed(*form("cirkd_table"), "experiment=cirkd_cityscapes")
        assert params == grid
        assert (job["dataset"]["name"], job["teacher"]["model"]["arch"], job["trainer"]["max_iters"]) == ("cityscapes", "DeepLabV3", 40000)


@pytest.mark.slow
@pytest.mark.parametrize("sweep, form", [("paper_table", "group"), ("seeds", "file"), ("zoo", "file"), ("cirkd_table", "group")])
def test_every_sweep_runs_at_smoke_size(tmp_path, session_dir, sweep, form):
    """Each sweep once, in one of the two forms (both forms compose the same config: the test above)."""
    overrides = {
        "paper_table": ["student=mobilenet_v2,resnet18", "loss=none,pi_pa", "seed=0"],
        "seeds": ["seed=0,1"],
        "zoo": ["loss=none,kd,fitnet", "seed=0"],
        # the sweep's own loss list (its kd + cirkd element), one student, CIRKD's queues at a smoke size
        "cirkd_table": ["student=pspnet_resnet18", "seed=0", "loss.terms.cirkd.pixel_memory_size=64",
                        "loss.terms.cirkd.region_memory_size=16", "loss.terms.cirkd.pixel_contrast_size=64",
                        "loss.terms.cirkd.region_contrast_size=16"],
    }[sweep]
    # the seeds sweep keeps the default tracking URI, which interpolates ${hydra:runtime.cwd}
    # (the summary callback runs after Hydra has unset its config)
    uri, sweep_dir = multirun(tmp_path, session_dir, *FORMS[form](sweep), *overrides, default_uri=sweep == "seeds")
    assert (sweep_dir / "summary.md").is_file()
    assert len(MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("kdseg").experiment_id], "tags.task = 'summary'")) == 1
    if sweep == "paper_table":
        # one figure per student; qualitative.png is the larger student's (ResNet-18, as in the paper)
        figure = (sweep_dir / "qualitative.png").read_bytes()
        assert figure == (sweep_dir / "qualitative_resnet18.png").read_bytes()
        assert (sweep_dir / "qualitative_mobilenet_v2.png").is_file()
        summary = (sweep_dir / "summary.md").read_text().splitlines()
        assert summary[2].startswith("| Teacher resnet101 |")
        # ResNet-18 (12.3 M) before MobileNet-V2 (4.4 M), although the sweep lists it second
        assert "| Student resnet18 | - | - |" in summary[3] and "| Student resnet18 | ✓ | ✓ |" in summary[4]
        assert "| Student mobilenet_v2 | - | - |" in summary[5] and "| Student mobilenet_v2 | ✓ | ✓ |" in summary[6]
    if sweep == "zoo":  # the baseline, then kd and fitnet in their configured order, each paired with it
        summary = (sweep_dir / "summary.md").read_text().splitlines()
        assert summary[0].startswith("| model | kd | fitnet | seeds |")
        assert [row.split(" | ")[1:3] for row in summary[3:6]] == [["-", "-"], ["✓", "-"], ["-", "✓"]]
        assert " (1) |" in summary[4] and " (1) |" in summary[5]
        assert (sweep_dir / "qualitative_resnet18.png").is_file() and (sweep_dir / "gains.png").is_file()
    if sweep == "cirkd_table":  # the baseline, then cwd, ifvd and kd + cirkd, each paired with it
        summary = (sweep_dir / "summary.md").read_text().splitlines()
        assert summary[0].startswith("| model | kd | cwd | ifvd | cirkd | seeds |")
        assert [row.split(" | ")[1:5] for row in summary[3:7]] == [
            ["-", "-", "-", "-"], ["-", "✓", "-", "-"], ["-", "-", "✓", "-"], ["✓", "-", "-", "✓"]]


@pytest.mark.slow
def test_a_new_term_is_one_module_and_one_yaml(tmp_path, session_dir):
    """A toy term, written as one module + one yaml outside the package, is trained, logged and summarised."""
    (tmp_path / "toyterm.py").write_text(
        "import torch\n"
        "from kdseg.losses.base import Term\n\n\n"
        "class ToyLoss(Term):\n"
        "    def __init__(self, weight, tap='logits', power=2.0):\n"
        "        super().__init__(weight, tap)\n"
        "        self.power = power\n\n"
        "    def loss(self, feat_s, feat_t, masks):\n"
        "        valid = (masks != 255).unsqueeze(1)\n"
        "        return ((feat_s - feat_t).abs().pow(self.power) * valid).mean()\n"
    )
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "loss" / "toy.yaml").write_text(
        "terms:\n  toy:\n    _target_: toyterm.ToyLoss\n    weight: 0.5\n    tap: logits\n    power: 2.0\n"
    )
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    uri, sweep_dir = multirun(tmp_path, session_dir, "--config-dir", str(tmp_path / "conf"), "loss=none,toy,pi_pa+toy", "seed=0", env=env)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kdseg").experiment_id], "tags.task = 'distill'")
    by_loss = {r.data.tags["loss"]: r for r in runs}
    assert sorted(by_loss) == ["none", "pi+pa+toy", "toy"]
    for loss in ("toy", "pi+pa+toy"):
        assert by_loss[loss].data.metrics["train/loss_toy"] > 0
        assert by_loss[loss].data.params["loss.terms.toy.weight"] == "0.5"
    assert "train/loss_toy" not in by_loss["none"].data.metrics
    summary = (sweep_dir / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| model | pi | pa | toy | seeds |")
    assert [line.split(" | ")[1:4] for line in summary[3:6]] == [["-", "-", "-"], ["-", "-", "✓"], ["✓", "✓", "✓"]]
