"""Train the members of a fused group together: one loader, one teacher pass per batch, then each
student's own step in turn.

Every member is the distillation job a run of its own would be (:func:`kdseg.tasks.distill.distill`),
with its own folder, checkpoints, ``run.json`` and MLflow run. The group builds what they share
(the datasets, the loaded teacher, the train loader) and advances the members' jobs one step each in
turn (they are generators that pause after every step). Around each member's turn the process's
global random streams are set to that member's, so whatever a member draws (dropout, drop path) it
draws from the stream a run of its own would use; its student and learned parts are built right
after the same seeding as a run of its own. On the CPU every member therefore ends with the weights
and metrics of the same job run alone.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdseg.data import build_datasets
from kdseg.distill import Distiller, active_terms, build_terms, term_label
from kdseg.errors import ConfigError
from kdseg.fused.feed import MemberBatches, SharedBatches, SharedVal, same_rng
from kdseg.job import build, loaders_for
from kdseg.models import load_pretrained, model_name
from kdseg.runtime import rng_state, set_rng_state
from kdseg.tasks.distill import distill
from kdseg.teacher import get_teacher
from kdseg.tracking import Tracker
from kdseg.train import STOP_SIGNALS, Trainer
from kdseg.utils import digest, flatten

MEMBER_KEYS = ("student", "loss", "logger.run_name", "paths.output_dir")
"""Config nodes in which the members of one group may differ; they agree on everything else."""


def group_key(cfg: DictConfig) -> str:
    """A digest of what a fused group's members share: the resolved config without :data:`MEMBER_KEYS`
    (so the same dataset and transforms, seed, teacher, schedule, batch, eval and tracking store)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    shared = {key: value for key, value in flat.items() if not any(key == m or key.startswith(f"{m}.") for m in MEMBER_KEYS)}
    return digest(shared, 16)


class Group:
    """What the members of one group share, built once: datasets, the loaded teacher, the loaders,
    and the teacher's pass on the batch the members are on."""

    def __init__(self, cfg: DictConfig, device: torch.device, distils: bool, val_cache_mib: float = 2048) -> None:
        self.cfg, self.device, self.val_cache_mib = cfg, device, val_cache_mib
        self.datasets = build_datasets(cfg.dataset)
        self.teacher: nn.Module | None = None
        self.teacher_checkpoint: tuple[dict | None, Any] = (None, None)
        if distils:
            pretrained = cfg.teacher.get("pretrained")
            if pretrained is not None:
                self.teacher, self.teacher_checkpoint = load_pretrained(pretrained, cfg.dataset.num_classes), (None, pretrained)
            else:
                self.teacher = build(cfg.teacher.model)
                self.teacher_checkpoint = get_teacher(cfg, self.datasets, self.teacher, device)
        self.feed: SharedBatches | None = None
        self._val: dict[int, SharedVal] = {}
        self.teacher_draws: dict[str, dict] = {}  # kdseg.tasks.distill.build_networks: one teacher build per random state
        self.teacher_pass = TeacherPass(lambda: self.feed.fetches)

    def loaders(self, model: Distiller) -> tuple[MemberBatches, SharedVal]:
        """A member's train loader (a view of the group's, assigned before training) and its val loader
        (one per padding stride, its decoded batches kept: members whose networks take the same input
        multiple share it)."""
        train, val = loaders_for(model, self.datasets, self.cfg.trainer, self.cfg.seed, self.device)
        stride = getattr(val.collate_fn, "keywords", {}).get("stride", 0)
        if stride not in self._val:
            self._val[stride] = SharedVal(val, self.val_cache_mib)
        return MemberBatches(len(train), self.cfg.seed), self._val[stride]

    def new_feed(self, model: Distiller) -> SharedBatches:
        """A fresh shared train loader (seeded as a run's own, :func:`~kdseg.job.loaders_for` of a
        member's ``model``: train crops fit every member's networks) for members that start at the same point."""
        self.feed = SharedBatches(loaders_for(model, self.datasets, self.cfg.trainer, self.cfg.seed, self.device)[0])
        return self.feed


class TeacherPass:
    """One teacher pass per batch for every student of a group (set as each Distiller's ``teacher_pass``).

    The first student to ask on a batch runs the teacher (its forward hooks fill every student's
    taps) and the logits are kept; the others get them while ``batch()`` (which names the batch the
    group is on) stays the same.
    """

    def __init__(self, batch: Callable[[], int]) -> None:
        self.batch = batch
        self._kept: tuple[int, torch.Tensor] | None = None

    def __call__(self, teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
        key = self.batch()
        if self._kept is None or self._kept[0] != key:
            self._kept = None  # the previous batch's outputs go first
            with torch.inference_mode():
                self._kept = (key, teacher(images))
        return self._kept[1]


@dataclass
class Member:
    """One job of a group: its config, its paused job, its random streams and how it ended."""

    cfg: DictConfig
    steps: Generator | None
    rng: dict | None = None
    trainer: Trainer | None = None
    result: Any = None
    done: bool = False
    failed: bool = False

    def advance(self) -> Any:
        """One turn: the member's job runs to its next pause with the member's random streams."""
        if self.rng is not None:
            set_rng_state(self.rng)
        try:
            return next(self.steps)
        except StopIteration as stop:
            self.finish(stop.value)
        except Exception as err:  # this member fails; the others go on
            self.finish(err, failed=True)
        finally:
            self.rng = rng_state()
        return None

    def fail(self, err: Exception) -> None:
        """End the member's job with ``err`` raised where it paused (its run is marked failed)."""
        try:
            self.steps.throw(err)
        except Exception as raised:
            self.finish(raised, failed=True)
        else:
            self.finish(err, failed=True)

    def finish(self, result: Any, failed: bool = False) -> None:
        self.result, self.done, self.failed, self.steps, self.trainer = result, True, failed, None, None


def carry_draws(fetcher: Member, members: Sequence[Member], drawn: tuple[dict, dict]) -> None:
    """The loader drew from the global streams while ``fetcher`` fetched a batch: every other member's
    own loader would have drawn the same from its streams, which a member can only match if its
    streams were where the fetcher's were (its steps drew as much as the fetcher's: the same
    architecture's dropout, say, or nothing)."""
    before, after = drawn
    for other in members:
        if other is fetcher or other.done:
            continue
        if not same_rng(other.rng, before):
            raise ConfigError(
                "hydra/launcher=fused cannot reproduce these runs: with trainer.num_workers=0 the loader's augmentations "
                "draw from the same random stream as the training steps, and the students' steps drew from it differently "
                f"(dropout or drop path: the {model_name(other.cfg.student)} student of {other.cfg.paths.output_dir} against "
                f"the {model_name(fetcher.cfg.student)} student of {fetcher.cfg.paths.output_dir}); set "
                "trainer.num_workers=1 or more (augmentations then draw in the loader's workers)"
            )
        other.rng = after


def member_label(cfg: DictConfig) -> str:
    """``resnet18 pi+pa seed 0``: which job an epoch line of a fused group is about."""
    weights = {name: node.weight for name, node in cfg.loss.terms.items()}
    return f"{model_name(cfg.student)} {term_label(active_terms(weights))} seed {cfg.seed}"


def run_group(cfgs: Sequence[DictConfig], device: torch.device, val_cache_mib: float = 2048,
              hydra_cfgs: Sequence[DictConfig] | None = None) -> list[Member]:
    """Train the jobs ``cfgs`` (resolved configs that agree on :func:`group_key`) together; returns the
    members, each with its final val mIoU (``result``) or the exception it failed with.

    ``val_cache_mib``: decoded val batches kept for every member's evaluations (:class:`SharedVal`).
    ``hydra_cfgs``: the jobs' whole configs (Hydra's node included), each set as Hydra's config while
    its member is set up (its run's tags, name and description read the job's own overrides)."""
    cfg = cfgs[0]
    if cfg.teacher.grad:
        raise ConfigError("teacher.grad=true back-propagates into the teacher of each run: its runs cannot share a teacher pass (hydra/launcher=fused)")
    group = Group(cfg, device, distils=any(build_terms(c.loss.terms) for c in cfgs), val_cache_mib=val_cache_mib)
    members = [Member(c, distill(c, Tracker.from_config(c.logger), device, group)) for c in cfgs]
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if main_thread else {}

    def stop(signum: int, _frame: object) -> None:  # every member stops after its current step
        for member in members:
            if member.trainer is not None:
                member.trainer.stop_signal = signal.Signals(signum).name

    try:
        for i, member in enumerate(members):  # set up as a run of its own, restore, stop before the first epoch
            if hydra_cfgs is not None:
                HydraConfig.instance().set_config(hydra_cfgs[i])
            member.trainer = member.advance()
            if member.trainer is not None:
                member.trainer.prefix = f"[{member_label(member.cfg)}] "
        # members resumed from different points train separately (each set in step with itself)
        starts: dict[tuple, list[Member]] = {}
        for member in members:
            if not member.done:
                position = member.trainer.position or {}
                starts.setdefault((member.trainer.start_epoch, position.get("steps", 0)), []).append(member)
        for start in sorted(starts):
            for sig in handlers:  # (a finished member's trainer put back the handler it found)
                signal.signal(sig, stop)
            train_together(group, starts[start])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return members


def train_together(group: Group, members: list[Member]) -> None:
    """Advance ``members`` one step each in turn, on the batches of one shared loader, until all are done."""
    feed = group.new_feed(members[0].trainer.model)
    for member in members:
        member.trainer.train_loader.shared = feed
    active = list(members)
    while active:
        for member in active:
            if member.done:  # (ended this round by another member's error)
                continue
            member.advance()
            if feed.drawn is not None:
                drawn, feed.drawn = feed.drawn, None
                try:
                    carry_draws(member, active, drawn)
                except ConfigError as err:
                    for other in active:
                        if not other.done:
                            other.fail(err)
        active = [m for m in active if not m.done]
