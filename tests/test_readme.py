"""The README and the docs/ pages cannot drift from the code: every command they show composes as written.

Each `python <entry point>.py ...` line of their `bash` blocks is composed by Hydra with its overrides (a
multirun's sweeps at their first value, with the `hydra` node: launcher, sweeper; a placeholder such as `<run>`
filled in); a misspelled option, key or group, or a value Hydra cannot parse, fails here. The CPU commands run
elsewhere, on a shorter schedule where a test's time asks for it (`debug=fast`): training on digits and
`test.py` in tests/test_train.py, `predict.py` in tests/test_predict.py, `export.py` in tests/test_export.py,
the sweeps in tests/test_distributed_sweep.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import CONF_DIR, REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY_POINTS = {"train.py": "train", "test.py": "test", "predict.py": "predict", "export.py": "export"}


def commands(page: Path) -> list[str]:
    """The entry-point commands of a page's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if len(words) >= 2 and words[0] == "python" and words[1] in ENTRY_POINTS:
            found.append(" ".join(shlex.quote(w) for w in words))
    return found


COMMANDS = [(page.relative_to(REPO), command) for page in PAGES for command in commands(page)]


def first_values(overrides: list[str]) -> list[str]:
    """The overrides with each sweep at its first value (a multirun's first job)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    chosen = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            chosen.append(f"{override.get_key_element()}={first}")
        else:
            chosen.append(text)
    return chosen


def test_the_pages_show_commands_of_every_entry_point() -> None:
    shown = {command.split()[1] for _, command in COMMANDS}
    assert shown == set(ENTRY_POINTS), shown
    assert len(COMMANDS) >= 40, len(COMMANDS)


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c[:90]}" for p, c in COMMANDS])
def test_every_command_of_the_readme_and_the_docs_composes(page: Path, command: str) -> None:
    words = shlex.split(command)
    config_name = ENTRY_POINTS[words[1]]
    multirun = "-m" in words
    # a placeholder (`<run>`) is the reader's to fill in
    overrides = first_values([re.sub(r"<([a-z_ ]+)>", r"\1", w).replace(" ", "_") for w in words[2:] if w != "-m"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=multirun)
    assert cfg is not None
