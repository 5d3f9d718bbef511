"""What the entry points share: a user's error is one message on stderr and exit status 2.

@hydra.main(...)
def main(cfg):
    with exit_on_user_error():   # errors inside the job (Hydra would print its own line before them)
        ...

if __name__ == "__main__":
    run_main(main)           # errors of the command line and config composition, before the job
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from dynamixer.errors import EXIT_USER_ERROR, SharedDataError, UserError
from dynamixer.machinery import signals
from dynamixer.machinery.requeue import uncompleted_slurm_jobs

USER_ERRORS = (UserError, ConfigCompositionException, OverrideParseException, MissingMandatoryValue)
# whether the user asked for tracebacks (HYDRA_FULL_ERROR=1); kept in the environment for DDP's re-launched ranks
_TRACES_ASKED = "DYNAMIXER_TRACES_ASKED"


def user_message(err: BaseException) -> str:
    """The message of a user's error, without the traceback that a data-loader worker wraps around it."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if "\nOriginal Traceback" in text and marker in text:
        text = text[text.rindex(marker) + len(marker) :]
    if isinstance(err, MissingMandatoryValue):
        text = f"{text}: give it on the command line ({err.full_key}=...)"
    return text.strip()


def _exit_with_message(err: BaseException, traces: bool | None = None) -> None:
    if os.environ.get(_TRACES_ASKED) == "1" if traces is None else traces:
        raise err
    if not isinstance(err, SharedDataError):  # that one, rank 0 prints
        print(f"Error: {user_message(err)}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR) from None


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Inside a Hydra job: a `UserError` (or a missing mandatory value) prints its message alone and exits
    with status 2; anything else is a bug and keeps its traceback. The stop signals are ours meanwhile (in a
    SLURM job, whose Python started with them blocked, this is where they are first handled)."""
    try:
        with signals.noted():
            yield
    except USER_ERRORS as err:
        _exit_with_message(err)


def run_main(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function: a bad override, config option or key prints its message alone and exits
    with status 2. `HYDRA_FULL_ERROR=1` shows the traceback of every error."""
    asked = os.environ.get(_TRACES_ASKED) or ("1" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "0")
    traces = asked == "1"
    try:
        # Hydra then re-raises errors of the composition here instead of printing them and exiting with 1;
        # the ranks that DDP starts inherit what the user asked for
        with _environ(HYDRA_FULL_ERROR="1", **{_TRACES_ASKED: asked}), signals.noted():  # the signals are ours
            main()
    except USER_ERRORS as err:
        _exit_with_message(err, traces)
    except OSError as err:
        if not _making_the_run_folder(err):
            raise
        _exit_with_message(
            UserError(
                f"cannot make the run folder {err.filename} ({err.strerror}): set paths.log_dir (or paths.root_dir, "
                "or DYNAMIXER_ROOT) to a folder you can write"
            ),
            traces,
        )
    except RuntimeError as err:
        # submitit's launcher (hydra/launcher=submitit_slurm): a job ended without a result (cancelled, killed,
        # stopped without requeue); its traceback holds nothing of use, the job's state and log do
        if type(err).__name__ != "UncompletedJobError" or traces:
            raise
        sweep_dir, lines = uncompleted_slurm_jobs(str(err))
        for line in lines:
            print(f"Error: {line}", file=sys.stderr)
        if sweep_dir is not None:
            _summarize(sweep_dir)
        raise SystemExit(1) from None


def _summarize(sweep_dir: Path) -> None:
    """The summary of a sweep that Hydra did not end (its callbacks' end is not called): the jobs that did not
    complete are rows with their last status (interrupted: saved at their last step)."""
    from dynamixer.sweep import summarize  # matplotlib: only for a sweep

    try:
        paths = summarize(sweep_dir)
    except FileNotFoundError:  # no job began its run
        return
    print(f"sweep summary: {paths['table']}", file=sys.stderr)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Environment variables set for the block and put back as they were after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _making_the_run_folder(err: OSError) -> bool:
    """Whether `err` is Hydra's failure to make the run's output folder (before any code of ours runs)."""
    frames = [frame.f_code for frame, _ in traceback.walk_tb(err.__traceback__)]
    return (
        err.filename is not None
        and any(
            code.co_name == "run_job" and code.co_filename.endswith(os.path.join("hydra", "core", "utils.py"))
            for code in frames
        )
        and frames[-1].co_filename.endswith("pathlib.py")
    )


class JobsElsewhere(Callback):
    """Hydra callback of a multirun whose launcher sends its jobs to a cluster (submitit): the launching
    process only waits for them, so a stop signal (`kill`, `timeout`) ends it at once instead of being noted
    for a training that never runs in it. The jobs go on."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        signals.end_on_signal(
            f"stopped waiting for the jobs of {sweep_dir}: they go on running on the cluster (squeue). Once "
            f"they end, `python -m dynamixer.sweep {sweep_dir}` summarises them"
        )
