"""Fixtures of the tests; the helpers they use are in helpers.py."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from helpers import entry_point, write_image_tree


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """3 classes, 4 train and 2 val JPEGs each."""
    return write_image_tree(tmp_path / "imagenet")


@pytest.fixture
def user_error(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> Callable[..., str]:
    """`user_error(script, args, cwd)` runs `python <script> *args` in process in `cwd` (the command line,
    Hydra, the run layer); it must stop with a user's error: exit status 2, one message on stderr, no
    traceback. Returns the message."""
    from dynamixer.run.cli import run_main

    def run(script: str, args: Sequence[str], cwd: Path) -> str:
        main = entry_point(script).main
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        monkeypatch.delenv("DYNAMIXER_TRACES_ASKED", raising=False)
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_main(main)
        message = capfd.readouterr().err
        assert exit_info.value.code == 2, message
        assert message.startswith("Error: ") and "Traceback" not in message, message
        return message

    return run
