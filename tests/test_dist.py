"""DDP plumbing (kdseg.dist): the one-process code path, and a real 2-process torchrun run on CPU (gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import RandomSampler

from kdseg import dist
from kdseg.checkpoint import load_checkpoint
from kdseg.data import build_loaders
from kdseg.main import run
from kdseg.models import FeatureTaps

from .conftest import ROOT


def test_shard_sampler_covers_the_split_once_without_padding():
    data = list(range(7))
    shards = [list(dist.ShardSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(dist.ShardSampler(data, num_replicas=2, rank=r)) for r in range(2)] == [4, 3]
    assert list(dist.ShardSampler(data)) == data  # one process: the whole split, in order


def test_one_process_takes_the_distributed_code_path():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert not dist.init("cpu")  # nothing to join without torchrun / a multi-task job
    data = [(torch.full((3, 16, 16), float(i)), torch.zeros(16, 16, dtype=torch.long)) for i in range(10)]
    train, val = build_loaders(data, data[:5], batch_size=2, num_workers=0, seed=3)
    # one process: the plain seeded shuffle (the loader's own generator, saved by checkpoints)
    assert isinstance(train.sampler, RandomSampler) and dist.train_sampler(data, 3) is None
    assert list(val.sampler) == list(range(5))

    def epochs(loader):
        orders = []
        for epoch in (1, 2):
            dist.set_epoch(loader, epoch)  # a no-op here
            orders.append([int(i) for images, _ in loader for i in images[:, 0, 0, 0]])
        return orders

    orders = epochs(train)
    assert sorted(orders[0]) == list(range(10)) and orders[0] != orders[1]  # reshuffled per epoch
    assert epochs(build_loaders(data, data[:5], batch_size=2, num_workers=0, seed=3)[0]) == orders  # reproducibly
    assert dist.all_true(True) and not dist.all_true(False)
    model = nn.Module()
    assert dist.wrap_model(model, torch.device("cpu"), sync_bn=True) is model
    sums = {"loss": torch.tensor(3.0)}
    assert dist.reduce_epoch(sums, 4) == (sums, 4)
    with dist.main_first():
        pass


def test_sync_batchnorm_conversion_keeps_feature_taps():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    taps = FeatureTaps(model, ["1"])
    model = dist.convert_sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm)
    model.eval()
    out = model(torch.randn(2, 3, 8, 8))
    assert taps["1"].shape == (2, 4, 6, 6) and torch.equal(torch.relu(taps["1"]), out)


def test_single_process_block_is_a_world_of_one():
    with dist.single_process():
        assert dist.world_size() == 1 and dist.is_main()


@pytest.mark.slow
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
    assert {p.name for p in run_dir.iterdir()} == {".hydra", "run.log", "config.yaml", "best.pt", "last.pt", "predictions.png", "per_class_iou.md", "run.json", "run.lock"}
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


@pytest.mark.slow
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
