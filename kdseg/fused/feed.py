"""One train loader for the members of a fused group: every member's k-th batch of an epoch is fetched once.

Each member's trainer reads a :class:`MemberBatches`, which looks like the loader a run of its own
would build: same length, and a ``generator`` seeded as that loader's, whose state follows what the
member's own loader would hold (checkpoints save it, a resume sets it). The members advance in
turn, one step each (:mod:`kdseg.fused.group`), so they ask for the same batch one after the other:
the first asks :class:`SharedBatches` to fetch it from the real loader, whose generator it first sets
to its own at the start of every epoch, and the others get the same tensors.

The loader may draw from the process's global random streams while it fetches (augmentations
run in the main process when ``trainer.num_workers=0``); :attr:`SharedBatches.drawn` then holds
the streams' states before and after the fetch, for the group to carry over to the other members
(:func:`kdseg.fused.group.carry_draws`).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from kdseg.runtime import rng_state


def same_rng(a: dict, b: dict) -> bool:
    """Whether two :func:`~kdseg.runtime.rng_state` readings of the global streams are equal."""
    (py_a, np_a), (py_b, np_b) = (a["python"], a["numpy"]), (b["python"], b["numpy"])
    return (
        py_a == py_b
        and np_a[0] == np_b[0] and torch.equal(np_a[1], np_b[1]) and np_a[2:] == np_b[2:]
        and torch.equal(a["torch"], b["torch"])
        and len(a["cuda"]) == len(b["cuda"]) and all(torch.equal(x, y) for x, y in zip(a["cuda"], b["cuda"]))
    )


class SharedBatches:
    """The real train loader of a group's members, fetched once per batch (see the module docstring)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.fetches = 0  # batches fetched so far: identifies the batch the members are on
        self.drawn: tuple[dict, dict] | None = None  # global RNG (before, after) the latest fetch, if it drew
        self._epoch = 0
        self._index = -1
        self._start: torch.Tensor | None = None
        self._batch: Any = None
        self._after: torch.Tensor | None = None
        self._iter: Iterator | None = None

    def get(self, member: MemberBatches, epoch: int, index: int) -> Any:
        """Batch ``index`` of the member's ``epoch``-th pass; None for one the group has passed (a
        resumed member skipping the batches its checkpoint already trained on)."""
        if epoch == self._epoch + 1:  # the first member to start an epoch starts the loader's
            self._epoch, self._index, self._batch, self._iter = epoch, -1, None, None
            self._start = member.generator.get_state()
            self.loader.generator.set_state(self._start)
        elif epoch != self._epoch:
            raise RuntimeError(f"fused members out of step: one is on its pass {epoch} over the data, the group on {self._epoch}")
        if index == 0 and not torch.equal(member.generator.get_state(), self._start):
            raise RuntimeError("fused members out of step: their loaders' generators differ at the start of an epoch")
        if index == self._index + 1:
            before = rng_state()
            if self._iter is None:
                self._iter = iter(self.loader)
            self._batch = next(self._iter)
            after = rng_state()
            self.drawn = None if same_rng(before, after) else (before, after)
            self._index, self._after = index, self.loader.generator.get_state()
            self.fetches += 1
        elif index > self._index:
            raise RuntimeError(f"fused members out of step: one asks for batch {index}, the group is on batch {self._index}")
        member.generator.set_state(self._after)
        return self._batch if index == self._index else None


class MemberBatches:
    """What one member's trainer reads as its train loader (see the module docstring)."""

    sampler = None  # no DistributedSampler: a fused group runs in one process

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.generator = torch.Generator().manual_seed(seed)  # as build_loaders seeds a run's own loader
        self.shared: SharedBatches | None = None  # set by the group before training starts
        self._passes = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        if self.shared is None:
            raise RuntimeError("a fused member's batches are read before its group assigned them")
        self._passes += 1
        for index in range(self.length):
            yield self.shared.get(self, self._passes, index)


class SharedVal:
    """A group's val loader (for one padding stride): the first full pass decodes the val images and
    keeps the batches, up to ``budget_mib``; every later evaluation, of any member, reads the kept
    ones (the same tensors, so the same metrics). Over the budget, every pass decodes again."""

    def __init__(self, loader: DataLoader, budget_mib: float) -> None:
        self.loader = loader
        self.dataset, self.sampler, self.batch_size = loader.dataset, loader.sampler, loader.batch_size
        self.budget = budget_mib * 2**20
        self.kept: list | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list | None = []
        size = 0
        for batch in self.loader:
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in batch)
                if size <= self.budget:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self.kept = kept  # (a pass stopped early, as a figure's first batch, keeps nothing)
