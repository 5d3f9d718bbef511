"""Train a model: `python train.py [group=option ...] [key=value ...]`; `--help` lists the options."""

import hydra
from omegaconf import DictConfig

from dynamixer.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    best = results.get("best") or {}
    return best.get(results.get("monitor"))


if __name__ == "__main__":
    main()
