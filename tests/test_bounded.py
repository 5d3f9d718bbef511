"""Every parser of a file from outside is bounded before it expands: a brace pattern naming a billion shards, a
sweep job's "billion laughs" YAML and a devkit file that inflates to gigabytes are one message each, in
seconds and within a memory bound; the sweep summary lists jobs it cannot read instead of failing."""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from dynamixer.bounded import check_mat_file
from dynamixer.errors import DataError
from helpers import QUIET_FAST, flatten_val, script_env, write_photo_tree

MEMORY_BOUND = 6 * 2**30  # address space a bounded parse may take, with Python, torch and the data modules loaded


def grown_mib(before: int) -> float:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_a_shard_pattern_naming_a_billion_shards_is_one_message(shard_sets, tmp_path: Path, user_error) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args = [*QUIET_FAST, "data=wds", f"data.data_dir={shard_sets['wds']}", "data.num_workers=0"]
    message = user_error("train.py", [*args, "data.train_shards='train-{000000000..999999999}.tar'"], tmp_path)
    assert "data.train_shards" in message and "more than 100000 shards" in message
    assert grown_mib(before) < 256


def laughs(depth: int = 12) -> str:
    """YAML of a few hundred bytes whose aliases expand to 10**depth strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_a_sweep_summary_lists_jobs_it_cannot_read_and_expands_no_alias(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    jobs = {
        "0_model.segments-1": (["model.segments=1"], {"status": "finished", "final": {"val/acc1": 0.5}}),
        "1_model.segments-2": (laughs(), None),  # a "billion laughs" overrides.yaml
        "2_model.segments-4": ({"model.segments": 4}, None),  # a mapping, not a list
        "3_model.segments-8": (["model.segments=8"], "not json {"),
        "4a_odd-name": (["model.segments=[&x [lol, lol], *x, *x]"], None),  # an alias in a value
    }
    for name, (overrides, results) in jobs.items():
        (sweep / name / ".hydra").mkdir(parents=True)
        text = overrides if isinstance(overrides, str) else json.dumps(overrides)
        (sweep / name / ".hydra" / "overrides.yaml").write_text(text)
        if results is not None:
            (sweep / name / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))

    def bounded() -> None:  # the summary in a process that cannot take more than the bound
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BOUND, MEMORY_BOUND))

    proc = subprocess.run(
        [sys.executable, "-m", "dynamixer.sweep", str(sweep)],
        capture_output=True, text=True, timeout=120, env=script_env(), preexec_fn=bounded,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["job"]: r for r in json.loads((sweep / "sweep.json").read_text())["jobs"]}
    assert rows["0_model.segments-1"]["status"] == "finished"
    for job in ("1_model.segments-2", "2_model.segments-4", "3_model.segments-8"):
        assert rows[job]["status"] == "unreadable", rows[job]
    assert "alias" in rows["1_model.segments-2"]["error"]
    assert rows["4a_odd-name"]["overrides"]["model.segments"].startswith("[")  # kept as the text it is


def test_python_m_dynamixer_sweep_on_a_folder_without_jobs_is_one_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dynamixer.sweep", str(tmp_path)], capture_output=True, text=True, env=script_env()
    )
    assert proc.returncode == 2 and proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr


def inflating_mat(path: Path, inflated: int) -> Path:
    """A MATLAB 5 file whose one compressed element inflates to `inflated` bytes (a few hundred kB on disk)."""
    deflate = zlib.compressobj(9)
    body = deflate.compress(struct.pack("<II", 14, inflated - 8))  # a matrix element as large as the rest
    chunk = bytes(2**20)
    for _ in range(inflated // len(chunk)):
        body += deflate.compress(chunk)
    body += deflate.flush()
    header = b"MATLAB 5.0 MAT-file".ljust(116, b" ") + bytes(8) + struct.pack("<H", 0x0100) + b"IM"
    path.write_bytes(header + struct.pack("<II", 15, len(body)) + body)
    return path


def test_a_devkit_file_that_inflates_past_the_bound_is_one_message(tmp_path: Path, user_error) -> None:
    photos = write_photo_tree(tmp_path / "imagenet")
    flat = flatten_val(photos)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    inflating_mat(devkit / "meta.mat", 256 * 2**20)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n" * len(flat))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args = [*QUIET_FAST, "data=imagenet", f"data.data_dir={photos}", "data.num_workers=0"]
    message = user_error(
        "train.py", [*args, f"data.val_labels={devkit / 'ILSVRC2012_validation_ground_truth.txt'}"], tmp_path
    )
    assert "meta.mat" in message and "inflates to over" in message
    assert grown_mib(before) < 256


def test_a_mat_file_within_the_bound_passes_and_a_damaged_one_is_one_error(tmp_path: Path) -> None:
    check_mat_file(inflating_mat(tmp_path / "small.mat", 4 * 2**20))
    damaged = tmp_path / "damaged.mat"
    damaged.write_bytes((tmp_path / "small.mat").read_bytes()[:128] + struct.pack("<II", 15, 16) + b"\xff" * 16)
    with pytest.raises(DataError):
        check_mat_file(damaged)
