"""Hydra launcher plugin ``hydra/launcher=fused``: a sweep's distillation jobs that read the same
batches and the same teacher train together, one teacher pass per batch (see :mod:`kdseg.fused`).

    python run.py -m sweep=zoo hydra/launcher=fused [hydra.launcher.max_students=16]
"""
from dataclasses import dataclass
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.kdseg_fused_launcher.fused_launcher.FusedLauncher"
    max_students: int = 16  # students trained together at most (each holds its weights and optimizer state)
    val_cache_mib: float = 2048  # decoded val batches a group keeps for its members' evaluations (over it: decoded per evaluation)


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="kdseg")


class FusedLauncher(Launcher):
    def __init__(self, max_students: int = 16, val_cache_mib: float = 2048) -> None:
        self.max_students, self.val_cache_mib = max_students, val_cache_mib
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kdseg.fused.launch import launch  # torch and smp load only when a sweep runs

        return launch(self, job_overrides, initial_job_idx)
