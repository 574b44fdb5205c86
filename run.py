"""kdseg entry point: ``python run.py [group=option ...] [key=value ...]`` (see README)."""
import sys

import hydra
from omegaconf import DictConfig

from kdseg.cli import expand_loss_sums


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from kdseg.errors import reported
    from kdseg.main import run

    with reported():  # a user-fixable error is one "error: ..." line (KDSEG_DEBUG=1: traceback)
        return run(cfg)


if __name__ == "__main__":
    sys.argv = expand_loss_sums(sys.argv)  # loss=kd+cwd -> loss=[kd,cwd]
    main()
