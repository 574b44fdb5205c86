"""Multirun seed sweeps: sweep ids, the summary file and MLflow run, and ``python -m kdseg.report``."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT, SMOKE


def multirun(tmp_path: Path, session_dir: Path, *args: str, default_uri: bool = False) -> tuple[str, Path]:
    """Run a smoke multirun in tmp_path; ``default_uri`` keeps the config's own tracking URI
    (``mlflow.db`` in the directory the user runs from) instead of passing one."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        sys.executable, str(ROOT / "run.py"), "-m", *args, *SMOKE,
        f"paths.data_dir={session_dir}/data", f"paths.cache_dir={session_dir}/cache",
        f"hydra.sweep.dir={tmp_path}/multirun", *([] if default_uri else [f"logger.tracking_uri={uri}"]),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
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

    csv_rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 3
    md = (sweep_dir / "summary.md").read_text()
    for loss in ("none", "pi"):
        values = [r.data.metrics["val/miou"] for r in children if r.data.params["loss.name"] == loss]
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
    assert report.split("\n\n")[0].strip() == md.strip()
    assert "| background |" in report


@pytest.mark.slow
@pytest.mark.parametrize("sweep", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_every_sweep_runs_at_smoke_size(tmp_path, session_dir, sweep):
    overrides = {"paper_table": ["student=mobilenet_v2,resnet18", "loss=none,pi_pa", "seed=0"], "seeds": ["seed=0,1"]}[sweep]
    # the seeds sweep keeps the default tracking URI, which interpolates ${hydra:runtime.cwd}
    # (the summary callback runs after Hydra has unset its config)
    uri, sweep_dir = multirun(tmp_path, session_dir, "--config-dir", str(ROOT / "sweeps"), "--config-name", sweep,
                              *overrides, default_uri=sweep == "seeds")
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


def test_summary_rows_larger_student_first_then_none_pa_pi_pi_pa():
    from kdseg.report import RunRecord, student_order, summarize

    def record(student: str, size: str, pi: str, pa: str, seed: int, miou: float) -> RunRecord:
        params = {"student.encoder_name": student, "params/student_m": size, "loss.pi_lambda": pi,
                  "loss.pa_lambda": pa, "loss.name": f"{pi}-{pa}", "seed": str(seed)}
        return RunRecord(f"{student}{pi}{pa}{seed}", params, {}, miou, miou, 0.5)

    records = [
        record(s, size, pi, pa, seed, 0.1 * seed)
        for s, size in (("small", "4.4"), ("big", "12.3"), ("alpha", "nan"), ("beta", "nan"))
        for pi, pa in (("100", "1"), ("0", "0"), ("100", "0"), ("0", "1"))
        for seed in (0, 1)
    ]
    # parameter count decides (a missing count counts as 0), then the name
    assert student_order(records) == ["big", "small", "alpha", "beta"]
    rows = summarize(records)
    assert [(r["student"], r["pixel_wise"], r["pair_wise"]) for r in rows[:4]] == [
        ("big", False, False), ("big", False, True), ("big", True, False), ("big", True, True)]
    assert [r["student"] for r in rows[4::4]] == ["small", "alpha", "beta"]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["final_miou_mean"] == pytest.approx(0.05)
