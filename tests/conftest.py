"""Fixtures of the tests; the helpers they use are in helpers.py."""

from __future__ import annotations

import glob
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# Without an NVIDIA GPU, Triton kernels (dynamixer.models.fused_mix) run on CPU tensors in Triton's interpreter,
# which has to be chosen before Triton is first imported (its own library functions are defined then); with
# one, the tests of the kernels run them compiled, on the GPU
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from slurm_cluster import SlurmCluster, install_packages, why_unavailable  # noqa: E402

from helpers import QUIET_FAST, compose_job_config, entry_point, write_image_tree, write_shard_sets  # noqa: E402


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one real training run (digits, dynamixer_tiny, `debug=fast`: 2 epochs of 3 steps), for the
    tests that read its files; a test that changes a file works on a copy."""
    from dynamixer.run import train

    folder = tmp_path_factory.mktemp("digits_run") / "run"
    train(compose_job_config(QUIET_FAST, folder))
    return folder


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """3 classes, 4 train and 2 val JPEGs each."""
    return write_image_tree(tmp_path / "imagenet")


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real-image data set in each format we read (`write_shard_sets`); read only by the tests."""
    return write_shard_sets(tmp_path_factory.mktemp("shard_sets"))


@pytest.fixture
def entry(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> Callable[..., tuple[int, str, str]]:
    """`entry(script, args, cwd)` runs `python <script> *args` in process in `cwd` (the command line, Hydra,
    the run layer) and returns its exit status, stdout and stderr."""
    from dynamixer.run.cli import run_main

    def run(script: str, args: Sequence[str], cwd: Path) -> tuple[int, str, str]:
        main = entry_point(script).main
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        monkeypatch.delenv("DYNAMIXER_TRACES_ASKED", raising=False)
        capfd.readouterr()
        code = 0
        try:
            run_main(main)
        except SystemExit as exit_info:
            code = exit_info.code
        out, err = capfd.readouterr()
        return code, out, err

    return run


@pytest.fixture
def user_error(entry: Callable[..., tuple[int, str, str]]) -> Callable[..., str]:
    """`user_error(script, args, cwd)` runs the entry point in process (`entry`); it must stop with a user's
    error: exit status 2, one message on stderr, no traceback. Returns the message."""

    def run(script: str, args: Sequence[str], cwd: Path) -> str:
        code, _, message = entry(script, args, cwd)
        assert code == 2, message
        assert message.startswith("Error: ") and "Traceback" not in message, message
        return message

    return run


class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that counts the connections made to it (`url` is its address)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def connections() -> Iterator[ConnectionCounter]:
    """A listener that counts connection attempts: what a file must never make us reach."""
    counter = ConnectionCounter()
    yield counter
    counter.server.close()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One SLURM cluster (tests/slurm_cluster.py) for the session, shared by every test module; skipped, with
    the reason, where it cannot start (a failure under CI=true)."""

    def unavailable(reason: str) -> None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the SLURM test cluster cannot start: {reason}")
        pytest.skip(f"the SLURM test cluster cannot start: {reason}")

    if reason := why_unavailable():
        unavailable(reason)
    try:
        install_packages()
    except RuntimeError as error:
        unavailable(str(error))
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()
