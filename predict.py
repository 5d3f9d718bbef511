"""Classify images with a checkpoint: `python predict.py ckpt_path=<file>.ckpt inputs=<file or folder>`."""

import hydra
from omegaconf import DictConfig

from dynamixer.run import predict
from dynamixer.run.cli import exit_on_user_error, run_main


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        predict(cfg)


if __name__ == "__main__":
    run_main(main)
