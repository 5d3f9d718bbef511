"""The run layer: a config becomes objects and a Trainer runs. One module per job.

- `build`: config -> data module and LightningModule (with its backbone)
- `checkpoints`: finding, checking and loading our training checkpoints
- `training`: fit a model, write `results.json`
- `evaluation`: validate a checkpoint (`test.py`), classify images (`predict.py`)
- `export`: a checkpoint as timm's / the Hub's folder (`export.py`)
- `cli`: what the entry points share (user errors as one message, exit status 2)
"""

from dynamixer.run.build import build
from dynamixer.run.checkpoints import load_model
from dynamixer.run.evaluation import evaluate, predict
from dynamixer.run.export import export
from dynamixer.run.training import train

__all__ = ["build", "evaluate", "export", "load_model", "predict", "train"]
