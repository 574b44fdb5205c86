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


@pytest.mark.slow
@pytest.mark.parametrize("sweep", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_every_sweep_runs_at_smoke_size(tmp_path, session_dir, sweep):
    overrides = {
        "paper_table": ["student=mobilenet_v2,resnet18", "loss=none,pi_pa", "seed=0"],
        "seeds": ["seed=0,1"],
        "zoo": ["loss=none,kd,fitnet", "seed=0"],
    }[sweep]
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
    if sweep == "zoo":  # the baseline, then kd and fitnet in their configured order, each paired with it
        summary = (sweep_dir / "summary.md").read_text().splitlines()
        assert summary[0].startswith("| model | kd | fitnet | seeds |")
        assert [row.split(" | ")[1:3] for row in summary[3:6]] == [["-", "-"], ["✓", "-"], ["-", "✓"]]
        assert " (1) |" in summary[4] and " (1) |" in summary[5]
        assert (sweep_dir / "qualitative_resnet18.png").is_file() and (sweep_dir / "gains.png").is_file()


def _record(student: str, size: str, weights: dict[str, str], seed: int, miou: float):
    from kdseg.report import RunRecord

    params = {"student.encoder_name": student, "params/student_m": size, "seed": str(seed), "loss.term_order": "pi,pa,kd"}
    params |= {f"loss.terms.{name}.weight": w for name, w in weights.items()}
    name = "+".join(n for n, w in weights.items() if float(w) > 0) or "none"
    return RunRecord(f"{student}-{name}-{seed}", params, {}, miou, miou, 0.5)


def test_summary_rows_larger_student_first_then_none_pi_pa_pi_pa():
    """As in the paper's table: the larger student first, then none, pi, pa, pi + pa (terms in config order)."""
    from kdseg.report import student_order, summarize, to_markdown

    records = [
        _record(s, size, {"pi": pi, "pa": pa, "kd": "0"}, seed, 0.1 * seed)
        for s, size in (("small", "4.4"), ("big", "12.3"), ("alpha", "nan"), ("beta", "nan"))
        for pi, pa in (("100", "1"), ("0", "0"), ("100", "0"), ("0", "1"))
        for seed in (0, 1)
    ]
    # parameter count decides (a missing count counts as 0), then the name
    assert student_order(records) == ["big", "small", "alpha", "beta"]
    rows = summarize(records)
    assert [(r["student"], r["loss"]) for r in rows[:4]] == [("big", "none"), ("big", "pi"), ("big", "pa"), ("big", "pi+pa")]
    assert [r["student"] for r in rows[4::4]] == ["small", "alpha", "beta"]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["final_miou_mean"] == pytest.approx(0.05)
    # one check-mark column per active term, in the configured order; kd is never on: no column
    head, _, first, second = to_markdown(rows).splitlines()[:4]
    assert head.startswith("| model | pi | pa | seeds |")
    assert first.startswith("| Student big | - | - | 2 |") and second.startswith("| Student big | ✓ | - | 2 |")


def test_summary_gain_is_paired_by_seed_against_the_same_students_baseline():
    from kdseg.report import summarize, to_markdown

    base = {0: 0.20, 1: 0.30, 2: 0.25}
    kd = {0: 0.23, 1: 0.31, 2: 0.29}  # gains 3, 1, 4 points
    records = [_record("r18", "12.3", {"pi": "0", "pa": "0", "kd": "0"}, s, v) for s, v in base.items()]
    records += [_record("r18", "12.3", {"pi": "0", "pa": "0", "kd": "1"}, s, v) for s, v in kd.items()]
    records += [_record("r18", "12.3", {"pi": "100", "pa": "0", "kd": "0"}, 5, 0.5)]  # no baseline of seed 5
    records += [_record("mbv2", "4.4", {"pi": "0", "pa": "0", "kd": "1"}, 0, 0.1)]  # no baseline of this student
    rows = {(r["student"], r["loss"]): r for r in summarize(records)}
    gain = rows[("r18", "kd")]
    assert gain["gain_n"] == 3
    assert gain["gain_mean"] == pytest.approx(0.08 / 3) and gain["gain_std"] == pytest.approx(0.015275252, rel=1e-6)
    assert rows[("r18", "pi")]["gain_n"] == 0 and rows[("mbv2", "kd")]["gain_n"] == 0
    assert rows[("r18", "none")]["gain_n"] == 0
    assert "| +2.67 ± 1.53 (3) |" in to_markdown(list(rows.values()))
    assert gain["gain_by_seed"] == pytest.approx({0: 0.03, 1: 0.01, 2: 0.04})


def test_gain_figure_only_for_rows_with_a_paired_baseline(tmp_path):
    from kdseg.report import summarize
    from kdseg.viz import save_gain_figure

    lone = [_record("r18", "12.3", {"pi": "100", "pa": "0", "kd": "0"}, 0, 0.5)]
    assert save_gain_figure(tmp_path / "none.png", summarize(lone)) is None and not (tmp_path / "none.png").exists()
    paired = lone + [_record("r18", "12.3", {"pi": "0", "pa": "0", "kd": "0"}, 0, 0.4)]
    path = save_gain_figure(tmp_path / "gains.png", summarize(paired))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
