"""Train a model: `python train.py [group=option ...] [key=value ...]`; `--help` lists the options."""

import signal

# before the seconds of imports: a stop or requeue signal then waits, pending, for the handler of
# dynamixer.machinery.signals (which unblocks them as the run starts) instead of ending the process unsaved;
# the set is signals.NOTED, written out because importing dynamixer is those seconds
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2})

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dynamixer.run import train  # noqa: E402
from dynamixer.run.cli import exit_on_user_error, run_main  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        results = train(cfg)
        best = results.get("best") or {}
        return best.get(results.get("monitor"))


if __name__ == "__main__":
    run_main(main)
