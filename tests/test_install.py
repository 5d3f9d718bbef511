"""The package as `pip install .` (not editable) installs it: a checkpoint is evaluated without `conf/`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package installed from a copy of its sources (`pyproject.toml`, `README.md`, `src/`: no `conf/`)
    into a folder of its own; returns that folder, for `PYTHONPATH`."""
    root = tmp_path_factory.mktemp("install")
    sources = root / "sources"
    shutil.copytree(REPO / "src", sources / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, sources / name)
    site = root / "site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*command, str(site), str(sources)], check=True, capture_output=True, timeout=600)
    assert (site / "dynamixer" / "run" / "stored_config.py").is_file() and not (site / "conf").exists()
    return site


def run_installed(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python *args` in `cwd` with the installed package first on the path (before the editable one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "DYNAMIXER_ROOT")}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_an_installed_package_rebuilds_a_checkpoints_model_from_the_checkpoint_alone(
    installed: Path, digits_run: Path, tmp_path: Path
) -> None:
    """In a folder without `conf/`: the model and its eval transform come from the checkpoint, and the logits
    are those of the model the checkpoint holds (built here, from the checkout's package)."""
    import torch

    from dynamixer.run.checkpoints import load_model

    checkpoint = digits_run / "checkpoints" / "last.ckpt"
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(image, tmp_path / "image.pt")
    script = (
        "import sys, torch, dynamixer\n"
        "from dynamixer.run.checkpoints import load_model\n"
        "model, stored = load_model(sys.argv[1], 'ema')\n"
        "torch.save({'file': dynamixer.__file__, 'logits': model(torch.load(sys.argv[2]))}, sys.argv[3])\n"
    )
    run_installed(
        installed, ["-c", script, str(checkpoint), str(tmp_path / "image.pt"), str(tmp_path / "out.pt")], tmp_path
    )
    out = torch.load(tmp_path / "out.pt")
    assert Path(out["file"]).is_relative_to(installed)  # the installed copy ran, not the checkout's
    model, _ = load_model(str(checkpoint), "ema")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(image))


def test_test_py_evaluates_a_checkpoint_with_the_installed_package(
    installed: Path, digits_run: Path, tmp_path: Path, entry
) -> None:
    """`python test.py ckpt_path=...` on the installed package gives the metrics the checkout's gives."""
    args = [f"ckpt_path={digits_run / 'checkpoints' / 'last.ckpt'}", "hardware=cpu", "run_name=e"]
    for where in ("installed", "checkout"):
        (tmp_path / where).mkdir()
    run_installed(installed, [str(REPO / "test.py"), *args], tmp_path / "installed")
    code, _, err = entry("test.py", args, tmp_path / "checkout")
    assert code == 0, err[-3000:]
    results = [
        json.loads((run_dir(tmp_path / where, "e", "test") / "eval.json").read_text())
        for where in ("installed", "checkout")
    ]
    assert results[0]["metrics"] == results[1]["metrics"] and "val/acc1" in results[0]["metrics"]
