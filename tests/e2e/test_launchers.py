"""Parallel sweeps on existing engines: the SLURM launcher config, and a joblib sweep logging to an MLflow server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from ..conftest import CONF_DIR, ROOT, SMOKE


def test_slurm_launcher_composes_into_sbatch_parameters(tmp_path, monkeypatch):
    """hydra/launcher=slurm: kdseg's defaults, overridable values, and the #SBATCH lines submitit writes."""
    import submitit

    overrides = [
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=90", "hydra.launcher.mem_gb=32", f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    node = cfg.hydra.launcher
    assert node._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (node.partition, node.gpus_per_node, node.tasks_per_node, node.nodes) == ("gpu", 4, 4, 1)
    assert (node.timeout_min, node.mem_gb, node.cpus_per_task) == (90, 32, 8)

    # the plugin's own launch(), with submitit's executor recorded instead of calling sbatch
    recorded: dict = {}

    class RecordingExecutor:
        def __init__(self, folder, cluster, **kwargs):
            recorded["init"] = {"folder": folder, "cluster": cluster, **kwargs}

        def update_parameters(self, **params):
            recorded["params"] = params

        def map_array(self, fn, *args):
            recorded["jobs"] = list(zip(*args))
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", RecordingExecutor)
    launcher = instantiate(node)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    assert recorded["init"]["cluster"] == "slurm" and len(recorded["jobs"]) == 2
    params = recorded["params"]
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4

    # the same parameters through the real submitit SLURM executor: the submission script
    monkeypatch.undo()
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun on this machine
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    for line in (
        "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --time=90", "#SBATCH --nodes=1",
    ):
        assert line in script, (line, script)


# ----------------------------------------------------------------------- MLflow server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifact store); stopped at the end."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = (store / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts"),
            "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, cwd=store, start_new_session=True,  # its own process group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(store / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, store
    finally:  # stop the server and its app-server workers
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_parallel_sweep_logs_every_run_to_one_mlflow_server(tmp_path, session_dir, mlflow_server):
    """2 jobs at once (joblib), both training the same missing teacher: the lock trains it once;
    both runs, the teacher run and the sweep summary land in the server's store."""
    url, store = mlflow_server
    cmd = [
        sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1",
        *SMOKE, "logger.log_checkpoints=all", f"paths.data_dir={session_dir}/data", f"paths.cache_dir={tmp_path}/cache",
        f"logger.tracking_uri={url}", f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("kdseg")
    runs = client.search_runs([exp.experiment_id])
    by_task: dict[str, list] = {}
    for r in runs:
        by_task.setdefault(r.data.tags["task"], []).append(r)
    assert sorted(by_task) == ["distill", "sweep", "teacher"], sorted(by_task)
    assert len(by_task["teacher"]) == 1  # the teacher cache lock: one job trained it, the other waited
    distill = by_task["distill"]
    assert sorted(r.data.params["seed"] for r in distill) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and "val/miou" in r.data.metrics for r in distill)
    (sweep_id,) = {r.data.tags["sweep_id"] for r in distill}
    (summary,) = by_task["sweep"]  # the sweep's parent run: every job (of either worker) nested under it
    assert summary.data.tags["sweep_id"] == sweep_id and summary.data.metrics["n_runs"] == 2
    assert all(r.data.tags["mlflow.parentRunId"] == summary.info.run_id for r in distill)
    assert "mlflow.parentRunId" not in by_task["teacher"][0].data.tags  # the cached teacher serves every sweep
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"summary.md", "summary.csv"} <= artifacts
    for r in distill:  # artifacts went through the server into its artifact root
        checkpoints = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")}
        assert {"checkpoints/best.pt", "checkpoints/last.pt"} <= checkpoints
    assert any((store / "artifacts").rglob("last.pt"))
    assert (tmp_path / "multirun" / "summary.md").is_file()


@pytest.mark.slow
@pytest.mark.ddp
def test_submitit_job_runs_ddp_inside(tmp_path, session_dir):
    """hydra/launcher=submitit_local with 2 tasks per job: the submitit path for real, one DDP run per job."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [
        sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=30", "loss=none", "seed=0", *SMOKE, f"paths.data_dir={session_dir}/data",
        f"paths.cache_dir={session_dir}/cache", f"logger.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdseg")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["task"] for r in runs) == ["distill", "sweep"]
    (run,) = [r for r in runs if r.data.tags["task"] == "distill"]
    (parent,) = [r for r in runs if r.data.tags["task"] == "sweep"]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id  # a SLURM task reads the parent from the sweep folder
    assert run.info.status == "FINISHED" and run.data.params["dist.world_size"] == "2"
    assert (tmp_path / "multirun" / "0" / "last.pt").is_file() and (tmp_path / "multirun" / "summary.md").is_file()
    logs = sorted((tmp_path / "multirun" / ".submitit").rglob("*_log.out"))
    assert [p.name.split("_")[1] for p in logs] == ["0", "1"]  # two tasks: rank 0 reports, rank 1 is quiet
    assert "outputs: " in logs[0].read_text() and "outputs: " not in logs[1].read_text()
