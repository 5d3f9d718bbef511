"""Train a model: `python train.py [group=option ...] [key=value ...]`; `--help` lists the options."""

import hydra
from omegaconf import DictConfig

from dynamixer.run import train
from dynamixer.run.cli import exit_on_user_error, run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        results = train(cfg)
        best = results.get("best") or {}
        return best.get(results.get("monitor"))


if __name__ == "__main__":
    run_main(main)
