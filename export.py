"""Export a checkpoint's weights for timm and the Hub: `python export.py ckpt_path=<file>.ckpt out_dir=<folder>`."""

import hydra
from omegaconf import DictConfig

from dynamixer.run.cli import exit_on_user_error, run_main
from dynamixer.run.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        export(cfg)


if __name__ == "__main__":
    run_main(main)
