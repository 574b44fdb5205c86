"""kdseg entry point: ``python run.py [group=option ...] [key=value ...]`` (see README)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from kdseg.main import run

    return run(cfg)


if __name__ == "__main__":
    main()
