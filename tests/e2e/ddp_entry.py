"""``run.py`` for the torchrun test: the real entry point, plus a dump of each rank's trained student.

After every ``Trainer.steps`` (the training loop, which ``Trainer.fit`` and ``kdseg.job.fit_steps`` run) the process writes its student's state dict to
``$KDSEG_TEST_DUMP/rank<R>-<run folder name>.pt`` so the test can compare the replicas.
"""
import os
import runpy
import sys
from pathlib import Path

import torch

import kdseg.train
from kdseg import dist

ROOT = Path(__file__).resolve().parents[2]
_steps = kdseg.train.Trainer.steps


def steps_and_dump(self):
    result = yield from _steps(self)
    out = Path(os.environ["KDSEG_TEST_DUMP"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(self.student.state_dict(), out / f"rank{dist.rank()}-{self.out_dir.name}.pt")
    return result


kdseg.train.Trainer.steps = steps_and_dump
sys.argv = [str(ROOT / "run.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
