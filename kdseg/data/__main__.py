"""``python -m kdseg.data [overrides ...]``: check every sample of the configured dataset.

Composes the same config as ``run.py`` (the same overrides), decodes every image and mask of
the train and val splits and reports every problem at once (exit code 1 if there is any)::

    python -m kdseg.data dataset=voc dataset.root=/data/VOCdevkit/VOC2012
    python -m kdseg.data dataset=cityscapes dataset.root=/data/cityscapes

The checks themselves are :mod:`kdseg.data.check`'s, the ones every training run makes.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from kdseg.data import dataset_root, split_samples
from kdseg.data.check import scan
from kdseg.errors import ConfigError, DataError, MissingDataError, one_line, reported
from kdseg.utils import not_a_folder

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def main(argv: Sequence[str] | None = None) -> int:
    """Decode every sample of the configured train and val splits and report all problems."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    cwd = os.getcwd()
    with reported():
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[f"paths.root_dir={cwd}", f"paths.output_dir={cwd}", *argv])
        except HydraException as err:
            raise ConfigError(one_line(err)) from err
        ds = cfg.dataset
        root = dataset_root(ds)
        if not root.is_dir():
            raise MissingDataError(f"dataset.root '{root}' {not_a_folder(root)} (expected the dataset's folder)")
        total = 0
        for split in ("train", "val"):
            try:
                samples, source, label_map = split_samples(ds, root, split)
            except DataError as err:
                print(f"{split}: {err}")
                total += 1
                continue
            problems = [p for found in scan(samples, ds.num_classes, deep=True, label_map=label_map) for p in found]
            for problem in problems:
                print(f"{split}: {problem}")
            print(f"{split}: {len(samples)} samples in {source}, {len(problems)} problem(s)")
            total += len(problems)
    print("dataset OK" if total == 0 else f"{total} problem(s) found")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
