"""Evaluate a checkpoint on the val split: `python test.py ckpt_path=<file>.ckpt [weights=ema|raw]`."""

import hydra
from omegaconf import DictConfig

from dynamixer.run import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="test")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
