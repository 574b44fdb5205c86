"""``hydra/launcher=fused``: what the launcher plugin (``hydra_plugins.kdseg_fused_launcher``) runs.

The sweep's jobs are composed as Hydra's basic launcher composes them (same folders, same
``.hydra/`` files, same callbacks); distillation jobs that agree on :func:`~kdseg.fused.group.group_key`
then train in groups of at most ``max_students`` (:func:`~kdseg.fused.group.run_group`), and every
other job (a lone member, ``task=teacher`` / ``eval``) runs as the basic launcher runs it.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, _save_config, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kdseg import dist
from kdseg.checkpoint import load_checkpoint
from kdseg.config import validate
from kdseg.errors import ConfigError, KdsegError, one_line, reported
from kdseg.fused.group import group_key, run_group
from kdseg.resume import LAST, fingerprint, read_run, run_config
from kdseg.runtime import configure_backends, resolve_device

log = logging.getLogger(__name__)


class Job:
    """One job of the sweep, composed and given its folder as :func:`hydra.core.utils.run_job` would."""

    def __init__(self, launcher: Any, idx: int, overrides: Sequence[str]) -> None:
        self.idx, self.overrides = idx, list(overrides)
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, self.overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        HydraConfig.instance().set_config(config)
        out = os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")), str(OmegaConf.select(config, "hydra.sweep.subdir")))
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = os.path.abspath(out)
        HydraConfig.instance().set_config(config)
        self.config = config
        self.task_cfg = copy.deepcopy(config)
        with read_write(self.task_cfg), open_dict(self.task_cfg):
            del self.task_cfg["hydra"]
        self.resolved = copy.deepcopy(self.task_cfg)
        OmegaConf.resolve(self.resolved)  # its own folder: members run side by side, Hydra's config holds one job's at a time
        self.hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)

    @property
    def fusable(self) -> bool:
        return self.resolved.task == "distill"

    def finished(self) -> float | None:
        """The final val mIoU of this job's run if its folder holds it finished (same config, ``trainer.resume=auto``):
        a relaunched fused sweep does not train it again."""
        out = Path(self.resolved.paths.output_dir)
        info = read_run(out) or {}
        if self.resolved.trainer.resume != "auto" or info.get("status") != "finished" or not (out / LAST).is_file():
            return None
        if info.get("fingerprint") != fingerprint(run_config(self.resolved)):
            return None
        return float(load_checkpoint(out / LAST)["history"][-1]["val/miou"])

    def start(self, launcher: Any) -> None:
        """What ``run_job`` does before calling the task: the folder, ``.hydra/``, ``on_job_start``."""
        HydraConfig.instance().set_config(self.config)
        out = Path(self.config.hydra.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.config.hydra.output_subdir is not None:
            hydra_out = out / str(self.config.hydra.output_subdir)
            _save_config(self.task_cfg, "config.yaml", hydra_out)
            _save_config(self.hydra_cfg, "hydra.yaml", hydra_out)
            _save_config(self.config.hydra.overrides.task, "overrides.yaml", hydra_out)
        launcher.hydra_context.callbacks.on_job_start(config=self.config, task_function=launcher.task_function)

    def end(self, launcher: Any, result: Any, failed: bool) -> JobReturn:
        """The job's :class:`JobReturn` (a kdseg error becomes the one line a run of its own exits with), ``on_job_end``."""
        ret = JobReturn(overrides=list(OmegaConf.to_container(self.config.hydra.overrides.task)), cfg=self.task_cfg,
                        hydra_cfg=self.hydra_cfg, working_dir=os.getcwd(), task_name=JobRuntime.instance().get("name"))
        if failed:
            if isinstance(result, KdsegError):  # Hydra raises it when the sweep reads the job's return value
                result = SystemExit(f"error: {one_line(result)}")
            ret.return_value, ret.status = result, JobStatus.FAILED
        else:
            ret.return_value, ret.status = result, JobStatus.COMPLETED
        HydraConfig.instance().set_config(self.config)
        launcher.hydra_context.callbacks.on_job_end(config=self.config, job_return=ret)
        return ret


def batches(jobs: Sequence[Job], max_students: int) -> list[list[Job]]:
    """The sweep's jobs in the order they run: distillation jobs that share a group key in groups of at
    most ``max_students`` (in sweep order), every other job on its own."""
    groups: dict[str, list[Job]] = {}
    out: list[list[Job]] = []
    for job in jobs:
        if not job.fusable:
            out.append([job])
            continue
        key = group_key(job.resolved)
        if key not in groups or len(groups[key]) == max_students:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(job)
    return out


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """The launcher plugin's ``launch``: compose every job, check them all, then run them in :func:`batches`."""
    setup_globals()
    config, max_students = launcher.config, launcher.max_students
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    with reported():
        if max_students < 1:
            raise ConfigError(f"hydra.launcher.max_students={max_students}: expected 1 or more students per group")
        if dist.launched_distributed():
            raise ConfigError(
                "hydra/launcher=fused trains a group's students in one process; under torchrun / a multi-task SLURM job "
                "run the sweep with the basic launcher (each job then uses every process)"
            )
        jobs = [Job(launcher, initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        for job in jobs:  # every job's config is checked before any of them trains
            try:
                validate(job.resolved)
            except KdsegError as err:
                raise ConfigError(f"job #{job.idx} ({' '.join(filter_overrides(job.overrides))}): {one_line(err)}") from None
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    returns: dict[int, JobReturn] = {}
    for job in jobs:
        miou = job.finished() if job.fusable else None
        if miou is not None:
            log.info(f"\t#{job.idx} : finished in {job.resolved.paths.output_dir} (val mIoU {100 * miou:.2f}), not run again")
            job.start(launcher)
            returns[job.idx] = job.end(launcher, miou, failed=False)
    plan = batches([job for job in jobs if job.idx not in returns], max_students)
    fused = sum(len(b) for b in plan if len(b) > 1)
    log.info(f"Launching {len(jobs)} jobs: {fused} in {sum(len(b) > 1 for b in plan)} fused group(s) "
             f"(at most {max_students} students each), {len(jobs) - fused - len(returns)} on their own"
             + (f", {len(returns)} finished before" if returns else ""))
    for batch in plan:
        for job in batch:
            log.info(f"\t#{job.idx} : {' '.join(filter_overrides(job.overrides))}")
        if len(batch) == 1:  # exactly as Hydra's basic launcher runs a job
            job = batch[0]
            returns[job.idx] = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                                       config=job.config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        else:
            for job in batch:
                job.start(launcher)
            with reported():
                first = batch[0].resolved
                device = resolve_device(first.trainer.device)
                configure_backends(first.trainer, device)
                members = run_group([job.resolved for job in batch], device, launcher.val_cache_mib, [job.config for job in batch])
            for job, member in zip(batch, members):
                returns[job.idx] = job.end(launcher, member.result, member.failed)
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    failed = [job for job in jobs if returns[job.idx].status == JobStatus.FAILED]
    if len(failed) > 1:  # Hydra reports the first one; name them all
        print(f"{len(failed)} of {len(jobs)} jobs failed:", flush=True)
        for job in failed:
            print(f"  #{job.idx} ({' '.join(filter_overrides(job.overrides))}): {returns[job.idx]._return_value}", flush=True)
    return [returns[job.idx] for job in jobs]
