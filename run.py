"""kdseg entry point: ``python run.py [group=option ...] [key=value ...]`` (see README.md and docs/)."""
import sys

import hydra
from omegaconf import DictConfig

from kdseg.cli import expand_loss_sums
from kdseg.errors import reported


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    # imported here, not at the top: torch and smp take seconds to import, which
    # `--help` and `--cfg job` need not wait for
    from kdseg.tasks import run

    with reported():  # a user-fixable error is one "error: ..." line (KDSEG_DEBUG=1: traceback)
        return run(cfg)


if __name__ == "__main__":
    sys.argv = expand_loss_sums(sys.argv)  # loss=kd+cwd -> loss=[kd,cwd]
    main()
