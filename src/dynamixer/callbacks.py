"""Lightning callbacks of our own beside the machinery's (`dynamixer.machinery.callbacks`): the metrics history
results.json is made from, the mixing figures loggers receive, and the count of host syncs a step makes."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from dynamixer.errors import ConfigError

log = logging.getLogger(__name__)


class MetricsHistory(Callback):
    """The validation metrics of every epoch, kept in checkpoints so that a resumed run keeps them.

    Runs before `ModelCheckpoint` (Lightning puts checkpoint callbacks last), so the checkpoint of an
    epoch already holds that epoch's entry.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.start_step = 0  # where this start of the run began: its checkpoint's step (0 for a first start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


class MixingFigures(Callback):
    """Every `every_n_epochs` validation epochs, the loggers that take images (W&B, TensorBoard) receive what
    the model generates for the first `num_images` validation images: the mixing matrices of `layer` per
    segment and the branch weights per layer (`dynamixer.visualize`, the figures of the notebook), logged
    as `mixing/matrices` and `mixing/branch_weights` at the current step. Rank 0 only; nothing without such
    a logger. It draws no random numbers, so resumed runs stay exact.
    """

    def __init__(self, every_n_epochs: int = 5, num_images: int = 4, layer: int = 0) -> None:
        if every_n_epochs < 1:
            raise ConfigError(
                f"callbacks.mixing_figures.every_n_epochs={every_n_epochs}: use 1 or more "
                "(or callbacks.mixing_figures=null)"
            )
        self.every_n_epochs, self.num_images, self.layer = every_n_epochs, num_images, layer
        self._images: Any = None

    def _loggers(self, trainer: L.Trainer) -> list:
        return [lg for lg in trainer.loggers if type(lg).__name__ in ("WandbLogger", "TensorBoardLogger")]

    def _due(self, trainer: L.Trainer) -> bool:
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and bool(self._loggers(trainer))
        )

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if batch_idx == 0 and self._due(trainer):
            self._images = batch[0][: self.num_images].detach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._images is None or not self._due(trainer):
            return
        from dynamixer.visualize import branch_weights_figure, mixing_figure, to_array

        images, self._images = self._images, None
        maps = pl_module.model.explain(images)
        figures = {"mixing/matrices": mixing_figure(maps, self.layer)}
        figures["mixing/branch_weights"] = branch_weights_figure(maps, self.layer)
        for key, fig in figures.items():
            if fig is None:
                continue
            array = to_array(fig)
            for logger in self._loggers(trainer):
                if type(logger).__name__ == "WandbLogger":
                    logger.log_image(key=key, images=[array], step=trainer.global_step)
                else:
                    logger.experiment.add_image(key, array, trainer.global_step, dataformats="HWC")


class HostSyncCounter(Callback):
    """Counts, in the main process, per training step from step `first` on for `steps` steps (whole loop
    iterations, from one step's start to the next: data fetch, step, logging, callbacks), the host reads of
    tensors (`aten._local_scalar_dense`: `.item()`, `bool(t)`, ...) and, on CUDA, the synchronizing calls that
    `torch.cuda.set_sync_debug_mode("warn")` reports; rank 0 writes `{"host_reads": [...], "cuda_syncs": [...]}`
    to `out`.

    Added to a train.py run as `+callbacks.host_syncs._target_=dynamixer.callbacks.HostSyncCounter
    +callbacks.host_syncs.first=10 +callbacks.host_syncs.steps=50 +callbacks.host_syncs.out=<file>`."""

    class _Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.count += 1
            return func(*args, **(kwargs or {}))

    def __init__(self, first: int, steps: int, out: str):
        self.first, self.steps, self.out = first, steps, Path(out)
        self.calls, self.reads, self.syncs = 0, [], []
        self._mode = self._warnings = self._caught = None
        self._writes = True

    def _syncs_seen(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self._caught) if self._caught is not None else 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._mode is not None:  # the step that just ended
            self.reads.append(self._mode.count - sum(self.reads))
            self.syncs.append(self._syncs_seen() - sum(self.syncs))
        if self.calls == self.first:
            self._writes = trainer.is_global_zero  # each rank counts its own; rank 0's are written
            self._start(pl_module.device)
        elif self.calls == self.first + self.steps:
            self._stop()
        self.calls += 1

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def _start(self, device: torch.device) -> None:
        if device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")  # every sync, not the first of each place
            torch.cuda.set_sync_debug_mode("warn")
        self._mode = self._Reads()
        self._mode.__enter__()

    def _stop(self) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(None, None, None)
        counted = {"host_reads": self.reads, "cuda_syncs": self.syncs if self._warnings is not None else None}
        if self._writes:
            self.out.write_text(json.dumps(counted))
