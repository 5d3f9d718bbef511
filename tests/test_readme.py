"""The README and the docs/ pages cannot drift from the code: every command they show composes as written.

Each `python <entry point>.py ...` line of their `bash` blocks is composed by Hydra with its overrides (a
multirun's every job, with the `hydra` node: launcher, sweeper; a placeholder such as `<run>`
filled in); a misspelled option, key or group, or a value Hydra cannot parse, fails here. The README's CPU runs
(the default run, then evaluating, predicting with, exporting and fine-tuning its checkpoint) run as written,
as scripts; its CPU sweeps (four default runs and more) run on a shorter schedule in
tests/test_distributed_sweep.py, and the GPU and SLURM commands are composed only.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import CONF_DIR, DIGITS_TRAIN, REPO, read_checkpoint, run_script, write_image_tree

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


def jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job of a multirun (every combination of its sweeps, as Hydra's basic sweeper
    makes them); a single run's overrides as they are."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [text]
        for o, text in zip(parsed, overrides)
    ]
    return [list(job) for job in itertools.product(*choices)]


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
    overrides = [re.sub(r"<([a-z_ ]+)>", r"\1", w).replace(" ", "_") for w in words[2:] if w != "-m"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs(overrides):  # a preset (`sweep=segments`): its grid is its own (tests/test_config.py)
            cfg = compose(config_name, overrides=job, return_hydra_config=multirun)
            assert cfg is not None


def runs_on_a_cpu(command: str) -> bool:
    """A single run the README shows for a CPU: no GPUs, no cluster, no ImageNet recipe, no sweep."""
    return not any(w in command.split() for w in ("-m", "hardware=slurm", "trainer.devices=8")) and (
        "experiment=" not in command
    )


@pytest.mark.slow
def test_the_readmes_cpu_runs_run_as_written(tmp_path: Path) -> None:
    """In the README's order: `python train.py` learns the digits; `test.py` on its last checkpoint gives that
    checkpoint's last validation again; `predict.py` classifies a folder; `export.py` writes the folder timm
    reads; the fine-tune trains from the checkpoint on an image folder. Only the placeholders are filled in:
    `<run>` the run just made, `/data/flowers` a folder of images written here (as `path/to/images`)."""
    readme = [c for c in commands(REPO / "README.md") if runs_on_a_cpu(c)]
    assert [c.split()[1] for c in readme] == ["train.py", "test.py", "predict.py", "export.py", "train.py"], readme
    flowers = write_image_tree(tmp_path / "flowers", train_per_class=43, val_per_class=4, size=(20, 20))
    images = write_image_tree(tmp_path / "path" / "to" / "images", train_per_class=0, val_per_class=1) / "val"
    runs = tmp_path / "logs" / "train" / "runs"
    for command in readme:
        before = set(runs.iterdir()) if runs.is_dir() else set()
        run = before and min(before).name  # the default run: the README's first
        words = [w.replace("<run>", str(run)).replace("/data/flowers", str(flowers)) for w in shlex.split(command)]
        proc = run_script(words[1], words[2:], cwd=tmp_path)
        if words[1] == "train.py":
            (folder,) = set(runs.iterdir()) - before
            results = json.loads((folder / "results.json").read_text())
            assert results["status"] == "finished" and Path(results["best_checkpoint"]).parent == folder / "checkpoints"
            assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "csv" / "metrics.csv").is_file()
            if len(words) == 2:  # the default run: it learned (chance is 10%), and says where everything went
                best, last_ema = results["best"], results["final"]["val/ema_acc1"]
                assert best["val/acc1"] >= 0.5, best
                assert results["epochs"] == 30 and results["global_step"] == 30 * (DIGITS_TRAIN // 32)
                best_ckpt = read_checkpoint(results["best_checkpoint"])
                assert (best_ckpt["epoch"], best_ckpt["global_step"]) == (best["epoch"], best["step"])
                assert f"results: {folder / 'results.json'}" in proc.stderr + proc.stdout
        elif words[1] == "test.py":
            (evaluation,) = (tmp_path / "logs" / "test" / "runs").glob("*/eval.json")  # the README's
            acc = json.loads(evaluation.read_text())["metrics"]["val/acc1"]
            assert acc == pytest.approx(last_ema, abs=1e-6)  # the last validation's EMA figure, again
            printed = re.search(r"^val/acc1: (\d\.\d{4})$", proc.stdout, re.MULTILINE)
            assert printed and float(printed.group(1)) == pytest.approx(acc, abs=5e-5)
            # and the raw weights of the best checkpoint give its validation again
            run_script("test.py", [f"ckpt_path={results['best_checkpoint']}", "weights=raw", "run_name=raw"], tmp_path)
            raw = json.loads((tmp_path / "logs" / "test" / "runs" / "raw" / "eval.json").read_text())
            assert raw["metrics"]["val/acc1"] == pytest.approx(best["val/acc1"], abs=1e-6)
        elif words[1] == "predict.py":
            (predictions,) = (tmp_path / "logs" / "predict" / "runs").glob("*/predictions.json")
            found = json.loads(predictions.read_text())
            assert len(found["predictions"]) == len(list(images.rglob("*.JPEG"))) == 3, found
        else:
            exported = tmp_path / "exported" / "my_dynamixer"
            assert {p.name for p in exported.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
