"""Evaluate a checkpoint on the val split: `python test.py ckpt_path=<file>.ckpt [weights=ema|raw]`."""

import hydra
from omegaconf import DictConfig

from dynamixer.run import evaluate
from dynamixer.run.cli import exit_on_user_error, run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="test")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        evaluate(cfg)


if __name__ == "__main__":
    run_main(main)
