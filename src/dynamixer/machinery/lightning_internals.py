"""The private state of Lightning (and torch) that dynamixer reads or sets, in one place.

Written for Lightning 2.6 (`pyproject.toml` bounds it to that minor version); `tests/test_lightning_internals.py`
fails naming the attribute if a release moves one. Why each is needed:
- the data position (`batch_progress`, `epoch_progress`): exact resume from the middle of an epoch;
- the stop flag (`_signal_connector.received_sigterm`): stop after this step on every rank at once, through
  Lightning's own SIGTERM exit (the checkpoint of that step, the loops' clean end);
- the training loop's per-step broadcast of that flag under DDP (`_broadcast_sigterm_tensor`: a collective
  and a host read every step), which our stop decision makes redundant, and Lightning's SIGTERM notifier
  (`_sigterm_notifier_fn`: it sets the flag on one rank, broadcasts from inside the handler and signals the
  ranks it launched), which would act from `fit`'s start until our handler is back;
- `ModelCheckpoint`'s save bookkeeping: save the last step (end of epoch, end of training) only once;
- a WandbLogger's run only if one was started (reading `.experiment` would start one);
- whether a module was compiled in place (`nn.Module.compile`);
- the rank processes Lightning started, to end them when this one fails (they would wait for it forever);
- the loops' state a checkpoint holds (`_checkpoint_connector._get_loops_state_dict`): the structure a
  checkpoint's loop progress is checked against before Lightning restores it (`dynamixer.checkpoint_reader`).
The CSV logger that appends to a resumed run's metrics.csv overrides two private hooks (`dynamixer.loggers`).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import lightning as L
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint

WRITTEN_FOR = "2.6"


def _private(obj: Any, path: str) -> Any:
    for name in path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise RuntimeError(
                f"Lightning {L.__version__} has no `{path}` (at `{name}`), which dynamixer reads for its stop path and "
                f"exact resume; it was written for Lightning {WRITTEN_FOR}: install lightning=={WRITTEN_FOR}.*"
            ) from None
    return obj


def batches_done(trainer: L.Trainer) -> int:
    """Training batches processed in the current epoch."""
    return _private(trainer, "fit_loop.epoch_loop.batch_progress.current.processed")


def epoch_being_trained(trainer: L.Trainer) -> int:
    """The epoch the training loop is in, as Lightning gives samplers (`set_epoch`); `current_epoch` is still
    the previous one when a run resumed mid-epoch makes its data iterator."""
    return _private(trainer, "fit_loop.epoch_progress.current.processed")


def stop_after_this_step(trainer: L.Trainer) -> None:
    """Make Lightning's loops end after this step (or validation batch) as on SIGTERM: `SIGTERMException`,
    the checkpoint callbacks' `on_exception`, the loggers closed."""
    _private(trainer, "_signal_connector.received_sigterm")
    trainer._signal_connector.received_sigterm = True


def skip_stop_flag_broadcast(trainer: L.Trainer) -> None:
    """Drop the broadcast of the stop flag from rank 0 that Lightning's training loop runs before every step
    under DDP (a collective and a read of its result: the step waits on the device). Only for a trainer whose
    ranks set the flag together, at the same step (`dynamixer.machinery.callbacks.StopOnSignal`)."""
    loop = _private(trainer, "fit_loop.epoch_loop")
    _private(loop, "_broadcast_sigterm_tensor")
    loop._broadcast_sigterm_tensor = lambda: None


def quiet_sigterm_notifier(trainer: L.Trainer) -> None:
    """Make the SIGTERM handler Lightning installs as `fit` starts call only the handler it found (ours,
    `dynamixer.machinery.signals`), not its notifier. Before `fit` registers its handlers (a callback's `setup`)."""
    connector = _private(trainer, "_signal_connector")
    _private(connector, "_sigterm_notifier_fn")
    connector._sigterm_notifier_fn = lambda signum, frame: None


def saves_every_epoch(callback: ModelCheckpoint) -> bool:
    """Whether a checkpoint callback saves by epochs (not by steps or time)."""
    return _private(callback, "_every_n_epochs") != 0


def save_unless_saved(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Save `callback`'s checkpoint of the current step unless it already saved this step."""
    if _private(callback, "_last_global_step_saved") != trainer.global_step:
        monitored = _private(callback, "_monitor_candidates")(trainer)
        trainer.save_checkpoint(callback.format_checkpoint_name(monitored))
        callback._last_global_step_saved = trainer.global_step


def launched_ranks(trainer: L.Trainer) -> list[Any]:
    """The rank processes this process started (Lightning's DDP re-launch of the script), if any."""
    return list(getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or [])


def started_wandb_run(logger: Any) -> Any:
    """A WandbLogger's run if one was started, else None (without starting one)."""
    return getattr(logger, "_experiment", None)


def is_compiled(module: nn.Module) -> bool:
    """Whether `module.compile()` was called (in place: the parameter names stay those of the eager module)."""
    return _private(module, "_compiled_call_impl") is not None


@cache
def loops_state_template() -> dict[str, Any]:
    """The loops' state that a checkpoint of this Lightning holds, as a fresh trainer writes it (all counts 0)."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the trainer's "GPU available" lines
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    finally:
        quiet.setLevel(level)
    return _private(trainer, "_checkpoint_connector._get_loops_state_dict")()
