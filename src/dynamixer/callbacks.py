"""Lightning callbacks of our own: what Lightning does not already provide."""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class StopOnInterrupt(Callback):
    """Ctrl-C (SIGINT) stops training the way SIGTERM does in Lightning: after the current optimizer
    step, so that `ModelCheckpoint(save_on_exception=True)` saves that exact step. A second Ctrl-C
    interrupts at once."""

    def __init__(self) -> None:
        self._previous: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def handler(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, self._previous)
            signal.raise_signal(signal.SIGTERM)  # Lightning's handler: stop after this step

        self._previous = signal.signal(signal.SIGINT, handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class MetricsHistory(Callback):
    """The validation metrics of every epoch, kept in checkpoints so that a resumed run keeps them.

    Runs before `ModelCheckpoint` (Lightning puts checkpoint callbacks last), so the checkpoint of an
    epoch already holds that epoch's entry.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for the resumable `last.ckpt`: by epochs, optimizer steps or time, and on SIGTERM
    or Ctrl-C, never on another exception.

    Lightning raises its SIGTERM exception between optimizer steps, on every rank at once, so that state
    is whole. Any other exception can come from the middle of a step (after the optimizer, before the EMA
    update) or from one rank only: a save then would replace the last good state with a torn one, or
    wait at a barrier for ranks that never come.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)
