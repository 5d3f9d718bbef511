"""Lightning callbacks of our own: what Lightning does not already provide."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils._python_dispatch import TorchDispatchMode

from dynamixer import signals
from dynamixer.errors import CheckpointWriteError, ConfigError
from dynamixer.lightning_internals import (
    batches_done,
    quiet_sigterm_notifier,
    save_unless_saved,
    saves_every_epoch,
    skip_stop_flag_broadcast,
    stop_after_this_step,
)

log = logging.getLogger(__name__)


def _closes_epoch(trainer: L.Trainer) -> bool:
    """Whether training is at the end of its epoch, or of its steps (`max_steps`)."""
    return batches_done(trainer) >= trainer.num_training_batches or trainer.global_step == trainer.max_steps


class StopOnSignal(Callback):
    """Acts on the stop signals while training: SIGTERM, Ctrl-C (SIGINT) and each signal in `requeue_on` stop
    training after the current optimizer step (or validation batch), with that exact step checkpointed
    (`ResumableCheckpoint`). A second Ctrl-C interrupts at once.

    SIGTERM and the requeue signals are noted by `dynamixer.signals` for the run's whole life (one that came
    during start-up stops training after its first step; Lightning's SIGTERM handler is replaced as training
    starts, and its notifier is made inert before that); Ctrl-C is taken over while training runs. The
    decision is taken after an optimizer step or a validation batch, never inside gradient accumulation.
    One process decides after each, at no cost. Several ranks decide together (one all-reduce and a read of
    its result: a signal may reach one rank only), so they stop at the same step, after every
    `every_n_steps`-th optimizer step or validation batch, after the first step of each start (a signal
    during start-up) and as each epoch ends; the steps in between read nothing back. At an epoch's end (its
    last step, or max_steps) the decision waits for the validation that closes it: the stop is saved at
    that step with the epoch complete, its metrics and epoch-end checkpoints included. A handler never acts
    by itself (Lightning's SIGTERM handler broadcast from inside the handler, wherever the rank was, and DDP
    runs hung in our tests).

    `requeue_on` is for a cluster's warning before a time limit or pre-emption (SLURM's `--signal`; submitit
    asks for SIGUSR2): after such a stop `requeue_requested` is set, and the run layer requeues the job,
    which then resumes the checkpoint.
    """

    def __init__(self, requeue_on: Sequence[str] = (), every_n_steps: int = 1) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(
                f"callbacks.stop_on_signal.every_n_steps={every_n_steps!r}: give a whole number of steps, 1 or more "
                "(how often the ranks of a DDP run decide together whether to stop)"
            )
        self.every_n_steps = every_n_steps
        names = [str(name) if str(name).startswith("SIG") else f"SIG{name}" for name in requeue_on]
        unknown = [name for name in names if name not in signal.Signals.__members__]
        if unknown:
            raise ConfigError(
                f"requeue_on: {unknown[0]} is not a signal of this system: use names such as SIGUSR2 (what submitit "
                "asks SLURM to send before a time limit), SIGUSR1 or SIGTERM"
            )
        self.requeue_on = [signal.Signals[name] for name in names]
        not_noted = [s.name for s in self.requeue_on if s not in signals.NOTED]
        if not_noted:
            raise ConfigError(
                f"requeue_on: {not_noted[0]} cannot be a requeue signal: use {', '.join(s.name for s in signals.NOTED)}"
            )
        self.requeue_requested = False
        self._interrupted = False
        self._start_step = self._last_step = 0
        self._scope: contextlib.ExitStack | None = None
        self._previous_sigint: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        quiet_sigterm_notifier(trainer)  # from fit's start on, a SIGTERM reaches our handler only
        skip_stop_flag_broadcast(trainer)  # the ranks set the stop flag together, below

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = self._last_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._scope = contextlib.ExitStack()  # a trainer used on its own: the signals are noted while it trains
        self._scope.enter_context(signals.noted())
        signals.take_back()  # from Lightning's SIGTERM handler, installed as fit started

        def interrupt(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, self._previous_sigint)  # a second Ctrl-C interrupts at once
            self._interrupted = True

        self._previous_sigint = signal.signal(signal.SIGINT, interrupt)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        step, stepped = trainer.global_step, trainer.global_step != self._last_step
        self._last_step = step
        if _closes_epoch(trainer):
            return  # decided as the epoch ends, after the validation that closes it
        # the same steps on every rank (global_step is): a collective here meets the other ranks' one
        if stepped and (trainer.world_size == 1 or step % self.every_n_steps == 0 or step == self._start_step + 1):
            self._stop_if_requested(trainer)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if (
            trainer.state.fn != "fit"
            or _closes_epoch(trainer)
            or batches_done(trainer) % trainer.accumulate_grad_batches
        ):
            # the validation that closes an epoch runs to its end (seconds, where a kill gives tens): a stop cut
            # into it would lose that epoch's metrics, which Lightning does not run again on a resume; one inside
            # gradient accumulation waits for the optimizer step
            return
        if trainer.world_size == 1 or (batch_idx + 1) % self.every_n_steps == 0:
            self._stop_if_requested(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank ends the epoch together: after its last step, its validation and its metrics; Lightning
        # stops once the epoch is complete, so the saved step is the epoch's last (and max_steps: no signal
        # waits past the end)
        self._stop_if_requested(trainer)

    def _stop_if_requested(self, trainer: L.Trainer) -> None:
        noted = signals.received()
        # every rank is at this same step: a collective here cannot cross another one
        if trainer.strategy.reduce_boolean_decision(bool(noted) or self._interrupted, all=False):
            requeue = any(s in self.requeue_on for s in noted)
            # a requeue asked of any rank is one for rank 0, which runs `scontrol requeue`
            self.requeue_requested = trainer.strategy.reduce_boolean_decision(requeue, all=False)
            signals.acted_on()
            # Lightning's loops raise SIGTERMException after this step (or validation batch), on every rank
            stop_after_this_step(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning's exit on a stop calls no callback's teardown

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.close()


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


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for the resumable `last.ckpt`: by epochs, optimizer steps or time, and on SIGTERM
    or Ctrl-C, never on another exception.

    Lightning raises its SIGTERM exception between optimizer steps, on every rank at once, so that state
    is whole. Any other exception can come from the middle of a step (after the optimizer, before the EMA
    update) or from one rank only: a save then would replace the last good state with a torn one, or
    wait at a barrier for ranks that never come.
    """

    def __init__(self, *args: Any, train_time_interval: timedelta | None = None, **kwargs: Any) -> None:
        if train_time_interval is not None and not isinstance(train_time_interval, timedelta):
            raise ConfigError(
                f"train_time_interval={train_time_interval} has no unit: give a duration, e.g. "
                "callbacks.last_checkpoint.train_time_interval={_target_: datetime.timedelta, minutes: 30}"
            )
        super().__init__(*args, train_time_interval=train_time_interval, **kwargs)

    write_error: str | None = None  # why the save of a stop's step failed (the previous last.ckpt stays)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            try:
                super().on_exception(trainer, pl_module, exception)
            except CheckpointWriteError as err:  # the stop goes on (and a requeue), from the previous checkpoint
                self.write_error = str(err)
                log.error("%s", err)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        # the last batch of an epoch is saved after the epoch's validation instead (below): resumed from a
        # checkpoint taken before it, Lightning would skip that validation and its metrics
        if batches_done(trainer) < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not saves_every_epoch(self):  # by steps or time: the end of an epoch is saved too
            save_unless_saved(self, trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # by steps or time the last interval can end before training does: the final state is saved too
        super().on_train_end(trainer, pl_module)
        save_unless_saved(self, trainer)


class RebuildSchedule(Callback):
    """A resumed run extended with a new length (`extend=true trainer.max_epochs=...`): the restored lr
    schedule, built for the old length, is replaced at the first step by one built for the new length and
    set at the current step, as timm's train.py does on a resume with other `--epochs`. `record` says when
    and what changed, for results.json."""

    def __init__(self, changed: dict[str, Any]) -> None:
        self.changed = changed
        self.record: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.rebuild_schedule()
        self.record = {"at_step": trainer.global_step, "changed": self.changed}


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
