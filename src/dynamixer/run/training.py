"""Training: fit a model as the config says, resume from checkpoints, write `results.json`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dynamixer.callbacks import MetricsHistory
from dynamixer.checkpoint_reader import RestoredStateCheck, check_weights_fit, read_checkpoint
from dynamixer.errors import EXIT_USER_ERROR, ConfigError, RankError, UserError
from dynamixer.machinery import signals
from dynamixer.machinery.callbacks import RebuildSchedule, ResumeState
from dynamixer.machinery.checkpoint_io import AtomicCheckpointIO
from dynamixer.machinery.lightning_internals import launched_ranks
from dynamixer.machinery.requeue import RequeueLimitReached, requeue_slurm_job, slurm_restarts
from dynamixer.machinery.run_folder import RunFolderError, claim_run_folder, record_config
from dynamixer.run.build import build, build_trainer, check_sections, instantiate_checked, model_size
from dynamixer.run.checkpoints import check_resume_config, resume_checkpoint
from dynamixer.utils.launch import (
    check_devices,
    command_overrides,
    cpu_bf16_warning,
    ddp_relaunch_of_this_job,
    is_first_process,
    is_multirun,
    job_slot,
    override,
    ranks_started_with,
    release_distributed,
)
from dynamixer.utils.provenance import provenance
from dynamixer.utils.results import write_results
from dynamixer.utils.tracking import close_loggers, configure_wandb, sweep_config

log = logging.getLogger(__name__)


def fit_results(trainer: L.Trainer, cfg: DictConfig, size: dict[str, Any], datamodule: Any) -> dict[str, Any]:
    """The content of `results.json`: final and best validation metrics, best checkpoint, model size, and
    the schedule's extension when this start extended it."""
    metrics = next(c for c in trainer.callbacks if isinstance(c, MetricsHistory))
    history = metrics.history
    extension = next((c.record for c in trainer.callbacks if isinstance(c, RebuildSchedule)), None)
    write_error = next((c.write_error for c in trainer.callbacks if getattr(c, "write_error", None)), None)
    monitor = getattr(trainer.checkpoint_callback, "monitor", None)
    pick = min if getattr(trainer.checkpoint_callback, "mode", "max") == "min" else max  # val/loss: the lowest
    best = pick((h for h in history if monitor in h), key=lambda h: h[monitor], default=None) if monitor else None
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return {
        "status": "finished",
        "final": history[-1] if history else None,
        "best": best,
        "monitor": monitor,
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) or None,
        "last_checkpoint": str(last) if last.is_file() else None,
        **size,
        # images skipped with data.skip_corrupt=true, by every loader worker and rank (data.corrupt_log)
        "data": {"corrupt_files": sorted(getattr(datamodule, "corrupt_files", []))},
        "epochs": trainer.current_epoch,
        "torch_threads": torch.get_num_threads(),  # of this process: side-by-side jobs share the cores
        "global_step": trainer.global_step,
        "start_step": metrics.start_step,  # the step this start resumed at (0: it began at the start)
        "overrides": command_overrides(),
        "output_dir": str(cfg.paths.output_dir),
        **provenance(),  # versions and git commit of this start (a resumed run: the code of its last start)
        **({"restarts": slurm_restarts()} if "SLURM_JOB_ID" in os.environ else {}),  # SLURM's requeues of the job
        **({"schedule_extended": extension} if extension else {}),
        **({"checkpoint_error": write_error} if write_error else {}),
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a model as `cfg` says and write `results.json` into the run folder.

    In a multirun, a failing job writes its error into its own `results.json` and the sweep goes on.
    """
    started = time.time()
    with signals.noted():  # from here to the end (or from run_main's start): no signal ends the run mid-way
        try:
            with job_slot(cfg.trainer) as slot_overrides, ddp_relaunch_of_this_job(slot_overrides):
                return _train(cfg, started)
        except Exception as err:
            if not is_multirun():
                raise
            log.exception("job failed; the sweep goes on")
            if not isinstance(err, RunFolderError):  # that folder is another run's: nothing is written into it
                record_config(cfg)  # the summary finds a job by its .hydra/overrides.yaml
                failure = {
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}",
                    "overrides": command_overrides(),
                }
                write_results(cfg.paths.output_dir, {**failure, **_timing(started)})
            return {"status": "failed"}
        finally:
            if is_multirun():
                # the next job needs a fresh process group; a single run keeps it until the process exits,
                # after its error is printed: ended here, the other ranks would end this one before that
                release_distributed()


def _end_launched_ranks(trainer: L.Trainer, err: BaseException) -> None:
    """After an error on rank 0, end the ranks it started: they would wait for it at the next collective.

    An error of another kind than the user's is often the consequence of a rank that ended first (a closed
    connection): such a rank is given a few seconds to end by itself, and when it ended with a user's error
    (its message printed), this rank's error becomes a `RankError` that points to it.
    """
    ranks = launched_ranks(trainer)
    deadline = time.monotonic() + (0 if isinstance(err, UserError) else 5)
    for rank in ranks:
        try:
            rank.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()
    failed = [i + 1 for i, rank in enumerate(ranks) if rank.returncode == EXIT_USER_ERROR]
    if failed and not isinstance(err, UserError):
        raise RankError(
            f"rank {failed[0]} ended with the error above (this rank then lost its connection: {type(err).__name__})"
        ) from err


def _timing(started: float) -> dict[str, Any]:
    """When the job started (UTC) and how long it has run, in seconds."""
    start = datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds")
    return {"started": start, "wall_s": round(time.time() - started, 3)}


def _end_stopped_run(trainer: L.Trainer, cfg: DictConfig, results: dict[str, Any]) -> NoReturn:
    """The end of a run that a signal stopped at a saved step (`last.ckpt`): on rank 0, results.json says so
    and, after a requeue signal, the SLURM job is requeued (results.json then says whether that worked); every
    rank exits with 143 (128 + SIGTERM)."""
    step, folder = trainer.global_step, cfg.paths.output_dir
    requeue = any(getattr(c, "requeue_requested", False) for c in trainer.callbacks)
    resume = f"python train.py <same overrides> run_name={cfg.run_name} ckpt_path=auto"
    if trainer.is_global_zero:
        write_results(folder, {**results, "status": "requeuing" if requeue else "interrupted"})
        if requeue:
            try:
                requeued = requeue_slurm_job()
            except OSError as err:  # no scontrol, it refused, or hydra.launcher.max_num_timeout is reached
                failed = "requeue_limit" if isinstance(err, RequeueLimitReached) else "requeue_failed"
                write_results(folder, {**results, "status": failed, "requeue_error": str(err)})
                log.error(
                    "stopped at step %d, but the requeue failed (%s): resubmit; it resumes with %s", step, err, resume
                )
            else:
                write_results(folder, {**results, "status": "requeued" if requeued else "interrupted"})
                if requeued:
                    log.warning("stopped at step %d and requeued; the job resumes from last.ckpt", step)
                else:
                    log.warning("stopped at step %d; not a SLURM job, nothing to requeue: resume with %s", step, resume)
        else:
            log.warning("stopped at step %d; resume with: %s", step, resume)
    raise SystemExit(128 + signal.SIGTERM)


def check_monitors(callbacks: dict[str, Any], module: Any) -> None:
    """Every metric a callback monitors is one the module logs (else it fails after the first validation)."""
    logged = module.validation_metrics()
    for key, callback in callbacks.items():
        monitor = getattr(callback, "monitor", None)
        if monitor is not None and monitor not in logged:
            hint = " (module.ema_decay=null turns off the EMA and its val/ema_* metrics)" if "ema" in monitor else ""
            raise ConfigError(
                f"callbacks.{key}.monitor={monitor} is not a metric this run logs{hint}: use one of "
                f"{', '.join(logged)}, e.g. callbacks.{key}.monitor=val/acc1"
            )


def _train(cfg: DictConfig, started: float) -> dict[str, Any]:
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} is not an integer from 0 to 2**32-1: give seed=<integer>, e.g. seed=42")
    check_sections(cfg, ("trainer",))
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
    if (steps is None or steps < 1) and (epochs is None or epochs < 1):
        raise ConfigError(
            f"trainer.max_epochs={epochs} with trainer.max_steps={steps}: a run needs a length (its lr schedule is "
            "built over it): give trainer.max_epochs=1 or more, or trainer.max_steps=1 or more"
        )
    check_devices(cfg.trainer)
    if (slow := cpu_bf16_warning(cfg.trainer)) and is_first_process():
        log.warning("%s", slow)
    resumed = resume_checkpoint(cfg)
    ckpt_path = resumed[0] if resumed else None
    extended = check_resume_config(*resumed, cfg) if resumed else None
    configure_wandb(cfg.get("logger"), cfg.paths.output_dir)  # before the run config is stored anywhere
    provenance()  # read now (and kept): the code this start runs, whatever changes in the checkout later
    run_id = None  # the ranks rank 0 starts save nothing
    if is_first_process():
        run_id = claim_run_folder(cfg, ckpt_path is not None or cfg.get("ckpt_path") == "auto", resumed)
        record_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    if resumed:  # the file's weights are those of this model (else Lightning's strict load fails mid-way)
        check_weights_fit(resumed[1]["state_dict"], module.state_dict(), ckpt_path)
    named = {k: instantiate_checked(c) for k, c in (cfg.get("callbacks") or {}).items() if c is not None}
    check_monitors(named, module)
    callbacks = list(named.values())
    callbacks.append(MetricsHistory())  # results.json is made from it
    callbacks.append(ResumeState(provenance()))  # the checkpoints' format, provenance and random states
    if resumed:
        callbacks.append(RestoredStateCheck(*resumed))
    if extended:
        callbacks.append(RebuildSchedule(extended))
    loggers = [instantiate_checked(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    # every checkpoint is written whole or not at all, whatever the trainer config's own plugins
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []] + [
        AtomicCheckpointIO(run_id, resumed, read_checkpoint)
    ]
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)

    size = model_size(module.model)
    for logger in trainer.loggers:
        logger.log_hyperparams(
            {
                **OmegaConf.to_container(cfg, resolve=True),
                **{f"model/{k}": v for k, v in size.items()},
                **sweep_config(),
            }
        )

    try:
        try:
            # resumed from the file read and validated above (AtomicCheckpointIO hands Lightning that content)
            with warnings.catch_warnings():
                # the EMA copy of the model is meant to stay in eval mode while the raw model trains
                warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
                # rank 0 picked the checkpoint and the ranks it starts take that file (read at another moment,
                # `auto` could find another: a save or a copy in between)
                with ranks_started_with([override("ckpt_path", ckpt_path)]):
                    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # SIGTERM, Ctrl-C or a requeue signal: last.ckpt holds this exact step
            _end_stopped_run(trainer, cfg, {**fit_results(trainer, cfg, size, datamodule), **_timing(started)})
        except BaseException as err:
            _end_launched_ranks(trainer, err)
            raise
        results = {**fit_results(trainer, cfg, size, datamodule), **_timing(started)}
        if trainer.is_global_zero:
            path = write_results(cfg.paths.output_dir, results)
            log.info("results: %s", path)
            log.info("checkpoints: %s", Path(cfg.paths.output_dir) / "checkpoints")
            log.info("logs: %s", ", ".join(str(lg.log_dir or lg.save_dir) for lg in trainer.loggers) or "none")
    finally:
        close_loggers(trainer.loggers)
    return results
