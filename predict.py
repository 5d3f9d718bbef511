"""Classify images with a checkpoint: `python predict.py ckpt_path=<file>.ckpt inputs=<file or folder>`."""

import hydra
from omegaconf import DictConfig

from dynamixer.run import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
