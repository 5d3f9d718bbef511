"""The stop and requeue signals (SIGTERM, SIGUSR1, SIGUSR2), noted by a handler of ours for a run's whole life.

A handler only notes what arrived, so no signal ends a run at a random point (a cluster's warning during
start-up included). Inside training `dynamixer.machinery.callbacks.StopOnSignal` acts on it after the step: that step is
checkpointed and, for a requeue signal, the job requeued. A signal that training did not act on (it came
after the last step) ends the process with 128 + its number once the run's results are written. Lightning
wraps SIGTERM in a handler of its own at the start of `fit` (it broadcasts from inside the handler, which can
cross a collective the ranks are in); `take_back` puts ours in its place as training starts.

A SLURM job's Python starts with these signals blocked (`hardware=slurm`'s setup): one that comes during its
imports is held pending by the kernel, and delivered to our handler when `noted` unblocks them.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

NOTED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_received: list[signal.Signals] = []
_depth = 0


def _note(signum: int, frame: Any) -> None:
    _received.append(signal.Signals(signum))


def received() -> list[signal.Signals]:
    """The noted signals no one has acted on yet, oldest first."""
    return list(_received)


def acted_on() -> None:
    """The noted signals are handled (a stop at a saved step): forget them."""
    _received.clear()


def end_on_signal(message: str) -> None:
    """From now on this process trains nothing (it waits on jobs that run elsewhere): a stop or requeue
    signal ends it at once with 128 + its number, printing `message`; one noted before ends it now."""

    def end(signum: int, frame: Any) -> None:
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for signum in NOTED:
            signal.signal(signum, end)
    if _received:
        first = _received[0]
        acted_on()
        end(first, None)


def take_back() -> None:
    """Inside a `noted` block: our handler again for each signal, in place of what others installed since."""
    if _depth > 0 and threading.current_thread() is threading.main_thread():
        for signum in NOTED:
            signal.signal(signum, _note)


@contextlib.contextmanager
def noted() -> Iterator[None]:
    """Note the stop and requeue signals while the block runs (the outermost block installs the handlers and
    puts the previous ones back); a signal still unhandled at its end exits with 128 + its number."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, _note) for s in NOTED} if _depth == 0 else {}
    # a signal held pending since the process started is delivered to _note here
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, NOTED) if _depth == 0 else None
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        pending = received() if _depth == 0 else []
        if _depth == 0:
            acted_on()
    if pending:  # reached only when the block ended without an exception of its own
        raise SystemExit(128 + pending[0])
