"""Multiruns: sweep ids, the summary file, the sweep's MLflow parent run with its runs nested under it,
``python -m kdseg.report``, and every sweep in both forms (``sweep=X`` and ``--config-dir sweeps --config-name X``)."""
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


def multirun(tmp_path: Path, session_dir: Path, *args: str, default_uri: bool = False, env: dict | None = None,
             after: tuple[str, ...] = ()) -> tuple[str, Path]:
    """Run a smoke multirun in tmp_path; ``default_uri`` keeps the config's own tracking URI
    (``mlflow.db`` in the directory the user runs from) instead of passing one; ``after``: overrides
    of the smoke settings (given after them)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        sys.executable, str(ROOT / "run.py"), "-m", *args, *SMOKE,
        f"paths.data_dir={session_dir}/data", f"paths.cache_dir={session_dir}/cache",
        f"hydra.sweep.dir={tmp_path}/multirun", *([] if default_uri else [f"logger.tracking_uri={uri}"]), *after,
    ]
    env = {k: v for k, v in (env or os.environ).items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return uri, tmp_path / "multirun"


def parent_of(client: MlflowClient, experiment_id: str, sweep_id: str):
    """The one parent run of a sweep."""
    (parent,) = client.search_runs([experiment_id], f"tags.task = 'sweep' and tags.sweep_id = '{sweep_id}'")
    return parent


def test_seed_sweep_is_a_parent_run_with_nested_children(tmp_path, session_dir):
    """``python run.py -m seed=0,1 loss=none,pi_pa trainer=smoke``: one parent run (the multirun's overrides
    as params) with the 4 runs nested under it, uniquely named, each with its data, description, commit and
    one uploaded checkpoint (the student's); the summary (files, figures, metrics in points) is the parent's,
    and ``python -m kdseg.report`` rebuilds it and updates the same parent."""
    uri, sweep_dir = multirun(tmp_path, session_dir, "seed=0,1", "loss=none,pi_pa", after=("logger.log_checkpoints=student",))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdseg")
    children = client.search_runs([exp.experiment_id], "tags.task = 'distill'")
    assert len(children) == 4
    sweep_ids = {r.data.tags["sweep_id"] for r in children}
    assert len(sweep_ids) == 1 and sweep_ids != {""}
    (sweep_id,) = sweep_ids
    parent = parent_of(client, exp.experiment_id, sweep_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"sweep-{sweep_id}"
    assert {"seed": "0,1", "loss": "none,pi_pa"}.items() <= parent.data.params.items()
    assert parent.data.tags["swept"] == "seed,loss" and parent.data.tags["sweep_dir"] == str(sweep_dir.resolve())
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert sorted(r.info.run_name for r in children) == [
        "resnet18 none seed0", "resnet18 none seed1", "resnet18 pi+pa seed0", "resnet18 pi+pa seed1"]
    assert len(client.search_runs([exp.experiment_id], "tags.task = 'summary'")) == 0  # no separate summary run any more

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for run in children:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit and tags["git_dirty"] in ("true", "false")
        assert tags["mlflow.source.name"] == str(ROOT / "run.py") and "seed=0,1 loss=none,pi_pa" in tags["command"]
        assert Path(tags["run_dir"]).parent == sweep_dir.resolve() and (Path(tags["run_dir"]) / "best.pt").is_file()
        note = tags["mlflow.note.content"]
        assert f"**{100 * run.data.metrics['val/miou']:.2f}%**" in note and f"seed {tags['seed']}" in note
        assert ("`pi` × 100, `pa` × 1" in note) == (tags["loss"] == "pi+pa")
        inputs = {(d.dataset.name, tuple(t.value for t in d.tags)) for d in run.inputs.dataset_inputs}
        assert inputs == {("synthetic/train", ("training",)), ("synthetic/val", ("validation",))}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best_student.pt"]
        assert not any(k.startswith(("paths.", "logger.")) or k.endswith("._target_") for k in run.data.params)
        assert not any(k.startswith("loss.terms.kd.") for k in run.data.params)  # a term at weight 0
        assert ("loss.terms.pi.weight" in run.data.params) == (tags["loss"] == "pi+pa")

    # the real-time figures: columns of the summary, from the runs' speed/* metrics
    header = (sweep_dir / "summary.md").read_text().splitlines()[0]
    assert header.endswith("| params (M) | GFLOPs | FPS |")
    gflops = {f"{r.data.metrics['speed/student_gflops']:.2f}" for r in children}
    assert len(gflops) == 1 and f"| 12.3 | {gflops.pop()} |" in (sweep_dir / "summary.md").read_text()
    csv_rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 3
    md = (sweep_dir / "summary.md").read_text()
    for loss in ("none", "pi+pa"):
        values = [r.data.metrics["val/miou"] for r in children if r.data.tags["loss"] == loss]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in md
        assert any(f"{mean!r}" in row or f"{mean}" in row for row in csv_rows)
        for run in (r for r in children if r.data.tags["loss"] == loss):  # the setting's summary, in points, on its runs
            metrics = client.get_run(run.info.run_id).data.metrics
            assert metrics["sweep/miou_mean"] == pytest.approx(100 * mean) and metrics["sweep/n_seeds"] == 2
    parent = client.get_run(parent.info.run_id)
    assert {"summary.md", "summary.csv", "summary_table.json", "gains.png", "qualitative.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["n_runs"] == 4 and parent.data.metrics["n_settings"] == 2
    assert md in parent.data.tags["mlflow.note.content"]
    best = max(("none", "pi+pa"), key=lambda loss: statistics.fmean(
        r.data.metrics["val/miou"] for r in children if r.data.tags["loss"] == loss))
    assert parent.data.tags["best_setting"] == f"resnet18 {best}"

    (sweep_dir / "summary.md").unlink()
    report = subprocess.run(
        [sys.executable, "-m", "kdseg.report", "--tracking-uri", uri, "--sweep-id", sweep_id, "--per-class"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert report.startswith(md) and "min wall time" in md
    assert "| background |" in report
    assert f"parent run {parent.info.run_id} updated" in report
    assert (sweep_dir / "summary.md").read_text() == md  # rebuilt in the sweep's folder
    assert len(client.search_runs([exp.experiment_id], f"tags.task = 'sweep' and tags.sweep_id = '{sweep_id}'")) == 1
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


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
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdseg").experiment_id
    (parent,) = client.search_runs([exp], "tags.task = 'sweep'")
    children = client.search_runs([exp], "tags.task = 'distill'")
    assert children and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert "summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
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
