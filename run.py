"""kdseg entry point: ``python run.py [group=option ...] [key=value ...]`` (see README)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from kdseg.errors import reported
    from kdseg.main import run

    with reported():  # a user-fixable error is one "error: ..." line (KDSEG_DEBUG=1: traceback)
        return run(cfg)


if __name__ == "__main__":
    main()
