"""The notebooks run top to bottom (nbclient, a python3 kernel) and show what they promise.

Each notebook is executed from a copy with its parameter cell's `WORK_DIR` pointed into `tmp_path` (so its
training runs land there), with notebooks/ as the working folder, and the executed copy is written into
`tmp_path`; the committed notebooks are never touched. They train with their defaults (`CKPT = None`,
`SWEEP_DIR = None`): a short dynamixer_tiny run, and a 3-job `debug=fast` sweep.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow  # trains models or runs the scripts

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = REPO / "notebooks"
MIXING = NOTEBOOKS / "mixing_matrices.ipynb"
SWEEP = NOTEBOOKS / "ablation_sweep.ipynb"
MAX_COMMITTED_BYTES = 200_000
CELL_TIMEOUT = 900  # s; a cell that trains takes a minute or two on a busy 2-core CPU


@pytest.fixture(scope="module")
def kernel_name() -> str:
    """`python3` when Jupyter knows it (ipykernel's own spec counts); else this interpreter's ipykernel, registered."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
        return "python3"
    except NoSuchKernel:
        import subprocess

        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)
        return "python3"


def parameter_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one code cell tagged `parameters`"
    return cells[0]


def execute(path: Path, tmp_path: Path, kernel: str, **parameters) -> nbformat.NotebookNode:
    """Run a copy of `path` with `parameters` appended to its parameter cell; write it to tmp_path; return it."""
    nb = nbformat.read(path, as_version=4)
    cell = parameter_cell(nb)
    cell.source += "\n# injected by tests/test_notebooks.py\n" + "".join(
        f"{k} = {v!r}\n" for k, v in parameters.items()
    )
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / f"executed_{path.name}")
    return nb


def outputs(nb, output_type: str | None = None) -> list:
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if output_type is None or o.output_type == output_type
    ]


def errors(nb) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in outputs(nb, "error")]


def images(nb) -> list[str]:
    return [o.data["image/png"] for o in outputs(nb) if "data" in o and "image/png" in o.data]


def text(nb) -> str:
    """Everything the notebook printed (streams and plain-text results)."""
    parts = []
    for o in outputs(nb):
        if o.output_type == "stream":
            parts.append(o.text)
        elif "data" in o and "text/plain" in o.data:
            parts.append(o.data["text/plain"])
    return "\n".join(parts)


# --- the committed notebooks ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [MIXING, SWEEP], ids=lambda p: p.stem)
def test_committed_notebook_is_valid_light_and_has_its_parameter_cell(path):
    assert path.stat().st_size < MAX_COMMITTED_BYTES, f"{path} is {path.stat().st_size:,} bytes: clear its outputs"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    source = parameter_cell(nb).source
    name = "CKPT" if path == MIXING else "SWEEP_DIR"
    assert re.search(rf"^{name} = None\b", source, re.M), f"the parameter cell must default to `{name} = None`"
    assert re.search(r"^WORK_DIR = None\b", source, re.M)
    assert nb.cells[0].cell_type == "markdown"


# --- executed top to bottom ------------------------------------------------------------------------------


def test_mixing_matrices_notebook_runs_and_shows_the_matrices_and_branch_weights(tmp_path, kernel_name):
    work = tmp_path / "work"
    nb = execute(MIXING, tmp_path, kernel_name, WORK_DIR=str(work))
    assert not errors(nb)
    printed = text(nb)

    # it trained its own checkpoint, in WORK_DIR, and loaded it
    ckpts = list((work / "logs" / "train" / "runs" / "mixing_nb" / "checkpoints").glob("*.ckpt"))
    assert ckpts, "the notebook did not train a checkpoint into WORK_DIR"
    assert "checkpoint: " in printed and "(ema weights)" in printed
    assert "classes ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']" in printed

    # explain: 7 layers of dynamixer_tiny, the first on the 4x4 grid of the default run's 16 px, with 4 segments
    assert "7 layers" in printed
    assert re.search(r"layer 0: mix_h \(8, 4, 4, 4, 4\), mix_w \(8, 4, 4, 4, 4\), branch_weights \(8, 64, 3\)", printed)
    # the branch weights per layer: 3 softmax weights per layer that sum to 1
    rows = re.findall(r"layer (\d+): h ([\d.]+)  w ([\d.]+)  c ([\d.]+)", printed)
    assert [int(r[0]) for r in rows] == list(range(7))
    for _, *weights in rows:
        assert abs(sum(map(float, weights)) - 1.0) < 2e-3

    # figures, inline: the digits, the mixing matrices, their spread across images, the branch weights
    assert len(images(nb)) >= 4
    executed = tmp_path / f"executed_{MIXING.name}"
    assert executed.is_file() and executed.stat().st_size < 2_000_000  # figures stay a sensible size


def test_ablation_sweep_notebook_runs_a_sweep_and_shows_one_row_per_job(tmp_path, kernel_name):
    work = tmp_path / "work"
    nb = execute(SWEEP, tmp_path, kernel_name, WORK_DIR=str(work))
    assert not errors(nb)
    printed = text(nb)

    sweep_dir = work / "logs" / "train" / "multiruns" / "nb"
    assert f"sweep folder: {sweep_dir}" in printed
    assert (sweep_dir / "sweep.md").is_file() and (sweep_dir / "sweep.png").is_file()
    assert "3 jobs, swept: model.segments; metric: val/acc1" in printed

    # the table: a header naming the swept key, then one finished row per job, in job order
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    header = lines[0]
    assert "model.segments" in header and "best val/acc1" in header
    header_cells = [c.strip() for c in header.strip("|").split("|")]
    job_rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert len(job_rows) == 3, printed
    seg = header_cells.index("model.segments")
    status = header_cells.index("status")
    acc = header_cells.index("best val/acc1")
    assert [r[seg] for r in job_rows] == ["2", "4", "8"]
    assert [r[0].split("_", 1)[0] for r in job_rows] == ["0", "1", "2"]
    assert all(r[status] == "finished" for r in job_rows)
    assert all(re.fullmatch(r"[01]\.\d{4}", r[acc]) for r in job_rows), job_rows  # a fraction, 4 places

    # the rendered Markdown table and the plot, inline
    assert any("text/markdown" in o.get("data", {}) for o in outputs(nb))
    assert images(nb)
    assert re.search(r"model\.segments=2: best val/acc1 [\d.]+, [\d,]+ parameters", printed)
    assert re.search(r"model\.segments=8: best val/acc1 [\d.]+, [\d,]+ parameters", printed)
    results = json.loads((sweep_dir / "sweep.json").read_text())
    assert [job["overrides"]["model.segments"] for job in results["jobs"]] == [2, 4, 8]
