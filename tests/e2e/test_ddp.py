"""Real 2-process torchrun runs on CPU (gloo): one run folder and MLflow run, identical replicas, resume."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdseg.checkpoint import load_checkpoint
from kdseg.tasks import run

from ..conftest import ROOT

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def test_torchrun_two_processes_match_one(tmp_path, session_dir, make_cfg):
    """torchrun --nproc_per_node=2 (gloo): one folder, one MLflow run, one checkpoint, identical
    replicas, and the all-reduced mIoU of the sharded evaluation equals a one-process evaluation."""
    dumps = tmp_path / "dumps"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [
        "trainer=smoke", "dataset.num_train=16", "dataset.num_val=7", "dataset.image_size=64",
        "trainer.max_iters=3", f"paths.data_dir={session_dir}/data", f"paths.cache_dir={tmp_path}/cache",
        f"logger.tracking_uri={uri}", "logger.run_name=ddp",
    ]
    env = dict(os.environ, KDSEG_TEST_DUMP=str(dumps), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).with_name("ddp_entry.py")), *overrides,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # Hydra's folder and everything in it exist once (the ranks agreed on the timestamped path)
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert {p.name for p in run_dir.iterdir()} == {".hydra", "run.log", "config.yaml", "best.pt", "last.pt", "best_student.pt",
                                                 "predictions.png", "per_class_iou.md", "run.json", "run.lock"}
    # only rank 0 prints: one epoch line for the teacher (trained by rank 0 alone), one for the student
    assert proc.stdout.count("epoch 1/1") == 2 and proc.stdout.count("outputs: ") == 1, proc.stdout

    # one distill run, one teacher run (the cached teacher is trained once, by rank 0 alone)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdseg")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["task"] for r in runs) == ["distill", "teacher"]
    (mrun,) = [r for r in runs if r.data.tags["task"] == "distill"]
    (trun,) = [r for r in runs if r.data.tags["task"] == "teacher"]
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["dist.world_size"] == "2" and trun.data.params["dist.world_size"] == "1"

    # both ranks trained the same student; the teacher was fitted on rank 0 only
    by_label: dict[str, list[int]] = {}
    for path in dumps.glob("rank*-*.pt"):
        rank, label = path.stem.split("-", 1)
        by_label.setdefault(label, []).append(int(rank[4:]))
    assert len(by_label) == 2 and sorted(by_label.pop(run_dir.name)) == [0, 1]
    assert list(by_label.values()) == [[0]]
    first, second = (torch.load(dumps / f"rank{r}-{run_dir.name}.pt") for r in (0, 1))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    ckpt = load_checkpoint(run_dir / "last.pt")
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(value, first[name]), name

    # the sharded (4 + 3 images), all-reduced evaluation equals one process evaluating the checkpoint
    miou = mrun.data.metrics["val/miou"]
    assert miou == ckpt["metrics"]["miou"]
    single = run(make_cfg(
        "task=eval", f"checkpoint={run_dir / 'last.pt'}", "dataset.num_val=7", "logger=none",
    ))
    assert single == miou


def _torchrun(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _epoch_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("epoch ")]


def test_torchrun_run_killed_and_relaunched_resumes_bit_identically(tmp_path, session_dir):
    """SIGKILL a 2-process run after its second epoch; the same command resumes it (every rank
    restores its own RNG streams) and ends with the uninterrupted run's metrics."""
    import signal
    import time

    def args(name: str) -> list[str]:
        return ["trainer=smoke", "trainer.device=cpu", "loss=none", "trainer.max_iters=null", "trainer.epochs=4",
                "dataset.num_train=16", "dataset.num_val=8", f"paths.data_dir={session_dir}/data",
                f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache-{name}",
                f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/{name}"]

    full = _torchrun(args("full"), tmp_path, tmp_path / "full.log")
    assert full.wait(900) == 0, (tmp_path / "full.log").read_text()[-3000:]
    first = _torchrun(args("cut"), tmp_path, tmp_path / "cut1.log")
    deadline = time.time() + 900
    while not any(line.startswith("epoch 2/4") for line in _epoch_lines(tmp_path / "cut1.log")):
        assert first.poll() is None and time.time() < deadline, (tmp_path / "cut1.log").read_text()[-3000:]
        time.sleep(0.2)
    # the machine dies: torchrun and its workers (which torchrun starts in their own sessions)
    os.killpg(first.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-f", f"hydra.run.dir={tmp_path}/cut"], check=False)
    first.wait()
    time.sleep(1)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] in (1, 2, 3)  # the line prints before its save
    again = _torchrun(args("cut"), tmp_path, tmp_path / "cut2.log")
    assert again.wait(900) == 0, (tmp_path / "cut2.log").read_text()[-3000:]
    assert "resuming" in (tmp_path / "cut2.log").read_text()

    def metrics(line: str) -> str:
        return line.split("(")[0]  # without the epoch's wall time

    resumed = {metrics(line) for line in _epoch_lines(tmp_path / "cut2.log")}
    full_lines = [metrics(line) for line in _epoch_lines(tmp_path / "full.log")]
    assert resumed and resumed <= set(full_lines) and full_lines[-1] in resumed
    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("full", "cut"))
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


def _cirkd_rank(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: push this rank's batch into a CIRKD term's queues."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        term = _small_cirkd()
        feat_t, masks = _cirkd_batch(rank)
        term.update_state(None, feat_t, masks)
        torch.save(term.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _small_cirkd():
    from kdseg.losses import CIRKDLoss

    term = CIRKDLoss(1.0, tap="x", num_classes=3, pixel_memory_size=8, region_memory_size=4, pixels_per_update=2, seed=1)
    term.setup((2, 4, 3, 3), (2, 5, 3, 3))
    return term


def _cirkd_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 5, 3, 3, generator=g), torch.randint(0, 3, (2, 3, 3), generator=g)


def test_cirkd_queues_take_every_ranks_batch(tmp_path):
    """Under DDP each rank pushes the embeddings of all ranks (the authors' concat_all_gather):
    both ranks end with the queues one process gets from the two batches concatenated."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_cirkd_rank, args=(port, str(tmp_path)), nprocs=2)
    alone = _small_cirkd()
    batches = [_cirkd_batch(rank) for rank in range(2)]
    alone.update_state(None, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in alone.state_dict().items():
            assert torch.equal(state[name], value), (rank, name)
