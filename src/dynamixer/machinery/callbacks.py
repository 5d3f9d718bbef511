"""The callbacks of the machinery: a stop signal ends training after a whole step (`StopOnSignal`), that step
is saved as the resumable `last.ckpt` (`ResumableCheckpoint`) holding what an exact resume needs beyond
Lightning's own state (`ResumeState`), and a resume extended to a new length rebuilds its schedule
(`RebuildSchedule`)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dynamixer.errors import CheckpointWriteError, ConfigError
from dynamixer.machinery import signals
from dynamixer.machinery.lightning_internals import (
    batches_done,
    quiet_sigterm_notifier,
    save_unless_saved,
    saves_every_epoch,
    skip_stop_flag_broadcast,
    stop_after_this_step,
)
from dynamixer.machinery.rng import rng_states, set_rng_states

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1  # the layout of our training checkpoints: the reader refuses any other


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


class ResumeState(Callback):
    """What each checkpoint of a run holds beyond Lightning's own state: its format, the `provenance` of the code
    that wrote it (package versions, git commit), and every rank's random states (dropout, drop path and mixup
    draws differ per rank), as plain values and tensors; restored on a resume, they and the data position make
    the resumed run repeat the uninterrupted one."""

    def __init__(self, provenance: dict[str, Any] | None = None) -> None:
        self.provenance = provenance or {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["dynamixer_format"] = CHECKPOINT_FORMAT
        checkpoint["provenance"] = self.provenance
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states_per_rank"] = gathered
        else:
            checkpoint["rng_states_per_rank"] = [states]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank:
            set_rng_states(per_rank[trainer.global_rank if trainer.global_rank < len(per_rank) else 0])
