"""Distributed data parallel plumbing: one training code path for 1 process and for N.

A run joins a process group when its environment describes one: ``torchrun`` (one
node or several) sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``..., and a SLURM job
launched by the submitit Hydra launcher with ``tasks_per_node > 1`` is translated to
the same variables. Otherwise the world has one process and every helper below is a
no-op (same calls, same code path).

- :func:`setup` (start of every task): join the group; ranks > 0 go quiet (no stdout,
  no log file, no progress bars). Only rank 0 writes files and talks to MLflow.
- :class:`DistributedHydra` (a Hydra callback): under ``torchrun`` every rank runs
  ``run.py``; rank 0 resolves Hydra's ``${now:...}`` timestamps and sends them to the
  others, so all ranks share one output folder, and only rank 0 writes ``.hydra/``.
- Data: :func:`train_sampler` (``DistributedSampler``, reshuffled by :func:`set_epoch`)
  and :class:`ShardSampler` (evaluation: disjoint shards, no padding duplicates).
- :func:`wrap_model`: ``DistributedDataParallel`` over the student only (the frozen
  teacher is replicated in every process, never synchronised), optional SyncBatchNorm.
- :func:`reduce_confusion`: one confusion matrix summed over the ranks' shards, so the
  mIoU equals a single-process evaluation.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, read_write
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from kdseg.runtime import resolve_device

_alone = False  # inside single_process(): this process acts as a world of one


def launched_distributed() -> bool:
    """True when the environment asks for more than one process (torchrun, a multi-task SLURM job)."""
    if _env_world_size() > 1:
        return True
    return _submitit_num_tasks() > 1


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _submitit_num_tasks() -> int:
    """Tasks of the submitit job this process belongs to (1 outside submitit jobs)."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return 1
    try:
        import submitit  # only SLURM jobs need it: not imported by every run

        return submitit.JobEnvironment().num_tasks
    except Exception:  # not a submitit job after all
        return 1


def init(device: torch.device | str = "cpu") -> bool:
    """Join the process group the environment describes (once); True when distributed.

    Backend: NCCL for CUDA (each process on GPU ``LOCAL_RANK``), gloo otherwise.
    """
    if tdist.is_available() and tdist.is_initialized():
        return True
    if not launched_distributed():
        return False
    if "RANK" not in os.environ:  # a submitit job with several tasks: export torchrun's variables
        import submitit  # only SLURM jobs need it: not imported by every run

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(destroy)
    return True


def destroy() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def world_size() -> int:
    if _alone or not (tdist.is_available() and tdist.is_initialized()):
        return 1
    return tdist.get_world_size()


def rank() -> int:
    if _alone or not (tdist.is_available() and tdist.is_initialized()):
        return 0
    return tdist.get_rank()


_rank = rank  # for code whose own argument is named ``rank``


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that logs, checkpoints and caches."""
    return rank() == 0


@contextmanager
def single_process() -> Iterator[None]:
    """Within the block this process is a world of one (no DDP, no sharding, no collectives).

    Used for work only rank 0 does while the others wait, such as training the cached teacher.
    """
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


def _collective_device() -> torch.device:
    """Where collectives' tensors live: NCCL needs this rank's GPU, gloo the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        device = _collective_device()
        if device.type == "cuda":
            tdist.barrier(device_ids=[device.index])
        else:
            tdist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first; the other ranks wait for it, then run it too."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_true(flag: bool) -> bool:
    """``flag`` of every rank AND-ed (one all-reduce under DDP; ``flag`` itself with one process)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    tdist.all_reduce(value, op=tdist.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (one shape on all ranks) concatenated along dim 0 in rank order,
    without gradient; ``tensor`` itself with one process."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def setup(cfg: Any, device: torch.device) -> None:
    """Join the process group (if launched distributed) for ``device``; ranks > 0 print and log nothing.

    Their stdout goes to ``os.devnull`` (errors still reach stderr), Hydra's log file
    handler is removed (rank 0 writes the log) and progress bars are switched off.
    """
    init(device)
    if is_main():
        return
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    cfg.trainer.progress = False


# ---------------------------------------------------------------------------- data


def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler | None:
    """This rank's part of a seeded shuffle of ``dataset`` (the same permutation on every rank);
    ``None`` with one process (the loader then shuffles with its own seeded generator).

    The last ``len % world_size`` images of each permutation are dropped so every rank
    runs the same number of steps; call :func:`set_epoch` each epoch to reshuffle.
    """
    if world_size() == 1:
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=True)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: disjoint shards that cover the dataset once.

    Unlike ``DistributedSampler`` it never pads with duplicates (shards may differ in
    size by one), so summing per-rank confusion matrices counts every pixel exactly once.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.size = len(dataset)
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = _rank() if rank is None else rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


def set_epoch(loader: Any, epoch: int) -> None:
    """Reshuffle a ``DistributedSampler`` for ``epoch`` (no-op for other samplers)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _sharded(loader: Any) -> bool:
    sampler = getattr(loader, "sampler", None)
    return isinstance(sampler, ShardSampler) and sampler.num_replicas > 1


def sync_buffers(model: nn.Module, loader: Any) -> None:
    """Before a sharded evaluation: every rank takes rank 0's BatchNorm statistics.

    DDP broadcasts buffers at the start of each forward, so after the last training
    step each rank holds its own running statistics; evaluating rank 0's model (the one
    that is checkpointed) on every shard needs them equal.
    """
    if _sharded(loader):
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=0)


def reduce_confusion(mat: torch.Tensor, loader: Any) -> None:
    """Sum the confusion matrices of a sharded evaluation in place (all ranks get the total)."""
    if _sharded(loader):
        tdist.all_reduce(mat)


def reduce_epoch(sums: dict[str, torch.Tensor], counts: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per-epoch training statistics over all ranks: loss sums averaged, counts (images seen, void batches) summed."""
    if world_size() == 1 or not sums:
        return sums, counts
    names, keys = sorted(sums), sorted(counts)
    device = sums[names[0]].device
    packed = torch.stack([sums[n].float() for n in names] + [torch.tensor(float(counts[k]), device=device) for k in keys])
    tdist.all_reduce(packed)
    reduced = packed.tolist()
    return ({n: packed[i] / world_size() for i, n in enumerate(names)},
            {k: int(reduced[len(names) + i]) for i, k in enumerate(keys)})


# --------------------------------------------------------------------------- model


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps forward hooks (feature taps).

    The conversion builds new modules (sharing the parameters), which would silently drop
    the hooks the distillation taps registered on BatchNorm layers.
    """
    hook_attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    hooks = {
        name: {a: getattr(m, a) for a in hook_attrs if hasattr(m, a)}
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, m in module.named_modules():
        for attr, value in hooks.get(name, {}).items():
            setattr(m, attr, value)
    return module


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel`` over a Distiller-like ``model`` when world size > 1.

    Gradients are averaged over the ranks for ``model.student`` only: everything under
    ``model.teacher`` (frozen, identical in every process) is neither broadcast nor
    synchronised. ``sync_bn`` converts the student's BatchNorm layers to SyncBatchNorm
    (CUDA only; ignored with a warning on CPU). World size 1: ``model`` unchanged.
    """
    if world_size() == 1:
        return model
    if sync_bn:
        if device.type == "cuda":
            convert_sync_batchnorm(model.student)
        else:
            warnings.warn("trainer.sync_bn needs CUDA; training with per-process BatchNorm", stacklevel=2)
    frozen = [
        name for name, _ in [*model.named_parameters(), *model.named_buffers()]
        if name.startswith("teacher.")
    ]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


# ---------------------------------------------------------------------------- hydra

class DistributedHydra(Callback):
    """Under ``torchrun``: one Hydra output folder for all ranks, written by rank 0 only.

    Every rank composes the config itself, so ``${now:...}`` in ``hydra.run.dir`` /
    ``hydra.sweep.dir`` would differ by the seconds between the ranks' starts. Rank 0
    resolves them and sends its resolver cache to the others (Hydra copies that cache
    into every sweep job's config, too), so each timestamp resolves the same everywhere.
    Ranks > 0 skip ``.hydra/`` (``hydra.output_subdir=null``). A no-op unless launched
    distributed; SLURM tasks of one submitit job already share their folder.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if self._share_timestamps(config) and not is_main():
            with read_write(config.hydra):
                config.hydra.output_subdir = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if self._share_timestamps(config) and not is_main():
            with read_write(config.hydra.overrides):
                config.hydra.overrides.hydra.append("hydra.output_subdir=null")

    @staticmethod
    def _share_timestamps(config: Any) -> bool:
        if _env_world_size() <= 1:
            return False
        init(resolve_device(config.trainer.device))
        cache = None
        if is_main():
            for key in ("hydra.run.dir", "hydra.sweep.dir"):
                OmegaConf.select(config, key, throw_on_resolution_failure=False)
            cache = OmegaConf.get_cache(config)
        OmegaConf.set_cache(config, broadcast_object(cache))
        return True
