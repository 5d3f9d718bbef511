"""Multirun sweeps and data-parallel training on CPU processes, end to end through train.py."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from dynamixer.sweep import collect, summarize, swept_keys
from helpers import QUIET, run_script

pytestmark = pytest.mark.slow  # trains models or runs the scripts


def test_parallel_ddp_sweep_on_cpu_keeps_each_job_in_its_folder_and_survives_a_bad_job(tmp_path: Path) -> None:
    """Two jobs side by side (hydra/launcher=parallel), each two CPU processes (DDP over gloo); the middle
    job's segments do not divide the width."""
    proc = run_script(
        "train.py",
        [
            "-m",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
            "model.segments=4,5,8",
            "hardware=cpu",
            "trainer.devices=2",
            "debug=fast",
            "trainer.limit_val_batches=1.0",
            "run_name=sweep",
            *QUIET,
        ],
        tmp_path,
    )
    sweep = tmp_path / "logs" / "train" / "multiruns" / "sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())  # named <num>_<overrides>
    assert [j.split("_", 1)[0] for j in jobs] == ["0", "1", "2"]
    assert all(f"model.segments-{s}" in j.split("__") for j, s in zip(jobs, (4, 5, 8))), jobs
    # the re-launched ranks ran in their job's folder: no stray single-run folders, no second sweep
    assert not (tmp_path / "logs" / "train" / "runs").exists()

    good = [json.loads((sweep / job / "results.json").read_text()) for job in (jobs[0], jobs[2])]
    for job, results in zip((jobs[0], jobs[2]), good):
        assert results["status"] == "finished"
        assert results["global_step"] == 2 * 3  # debug=fast: 2 epochs of 3 batches on each rank
        ckpts = sorted(p.name for p in (sweep / job / "checkpoints").iterdir())
        # by rank 0: the best epoch, last.ckpt and the last.ckpt it replaced (kept until a newer one is whole)
        assert len(ckpts) == 3 and ckpts[0].startswith("epoch") and ckpts[1:] == ["last.ckpt", "last.prev.ckpt"], ckpts
    assert good[0]["num_params"] != good[1]["num_params"]  # each job built its own model
    bad = json.loads((sweep / jobs[1] / "results.json").read_text())
    assert bad["status"] == "failed" and "segments=5" in bad["error"]
    # side by side: the first two jobs started together, and the third while the first still ran
    spans = [(datetime.fromisoformat(r["started"]).timestamp(), r["wall_s"]) for r in (good[0], bad, good[1])]
    assert all(start < spans[0][0] + spans[0][1] for start, _ in spans[1:]), spans

    # the summary ran at the end of the sweep: one row per job, the bad one marked
    table = (sweep / "sweep.md").read_text()
    assert "sweep summary" in proc.stdout
    assert table.count("| finished |") == 2 and table.count("| failed |") == 1
    assert (sweep / "sweep.png").stat().st_size > 1000
    assert swept_keys(collect(sweep)) == ["model.segments"]

    # metrics were synced over both ranks: one process evaluating the same weights on the whole val
    # split gives the same top-1 as the 2-process run reported
    job = sweep / jobs[0]
    evaluation = run_script("test.py", [f"ckpt_path={job / 'checkpoints' / 'last.ckpt'}", "weights=raw"], tmp_path)
    eval_json = next((tmp_path / "logs" / "test" / "runs").glob("*/eval.json"))
    single = json.loads(eval_json.read_text())["metrics"]["val/acc1"]
    assert abs(single - good[0]["final"]["val/acc1"]) < 1e-6, evaluation.stdout


def test_sweep_summary_reads_overrides_and_results(tmp_path: Path) -> None:
    """The summariser on a hand-written sweep folder: swept keys, table rows, plot."""
    for num, (reduced, acc) in enumerate([(1, 0.5), (2, 0.75), (4, 0.7)]):
        job = tmp_path / f"{num}_model.reduced_dim={reduced}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.reduced_dim={reduced}", "debug=fast"]))
        results = {"status": "finished", "monitor": "val/acc1", "best": {"val/acc1": acc}, "num_params": 10 + num}
        (job / "results.json").write_text(json.dumps(results))
    paths = summarize(tmp_path)
    rows = json.loads(paths["json"].read_text())
    assert rows["swept"] == ["model.reduced_dim"] and rows["metric"] == "val/acc1"
    lines = paths["table"].read_text().splitlines()
    assert lines[2].startswith("| 0_model.reduced_dim=1 | 1 | finished | 0.5000")
    assert lines[3].startswith("| 1_model.reduced_dim=2 | 2 | finished | 0.7500")
    assert paths["plot"].stat().st_size > 1000


def write_job(sweep: Path, num: int, overrides: dict, acc: float, status: str = "finished") -> None:
    job = sweep / f"{num}_job"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    results = {"status": status, "monitor": "val/acc1", "best": {"val/acc1": acc} if status == "finished" else None}
    results["wall_s"] = 10.0 + num
    (job / "results.json").write_text(json.dumps(results))


def test_seeds_are_replicates_with_mean_std_and_their_values(tmp_path: Path) -> None:
    values = {1: [0.90, 0.92, 0.94], 8: [0.95, 0.97, 0.96]}
    num = 0
    for segments, accs in values.items():
        for seed, acc in enumerate(accs):
            write_job(tmp_path, num, {"model.segments": segments, "seed": seed}, acc)
            num += 1
    write_job(tmp_path, num, {"model.segments": 8, "seed": 3}, 0.0, status="failed")  # not counted
    paths = summarize(tmp_path)
    report = json.loads(paths["json"].read_text())
    by_value = {s["values"]["model.segments"]: s for s in report["settings"]}
    assert by_value[1]["n"] == 3 and by_value[8]["n"] == 3 and by_value[8]["jobs"] == 4
    assert by_value[1]["metrics"]["val/acc1"]["values"] == [0.90, 0.92, 0.94]
    assert by_value[1]["metrics"]["val/acc1"]["mean"] == pytest.approx(0.92)
    assert by_value[1]["metrics"]["val/acc1"]["std"] == pytest.approx(0.02)  # sample std
    assert by_value[8]["metrics"]["val/acc1"]["mean"] == pytest.approx(0.96)
    assert by_value[1]["wall_s"] == pytest.approx(11.0)  # jobs 0, 1, 2
    table = paths["table"].read_text().splitlines()
    assert table[0].startswith("| model.segments | n | best val/acc1 (mean ± std)")
    assert table[2].startswith("| 1 | 3 | 0.9200 ± 0.0200") and table[3].startswith("| 8 | 3 | 0.9600 ± 0.0100")
    assert paths["plot"].stat().st_size > 1000


def test_a_two_axis_sweep_is_shown_as_a_grid(tmp_path: Path) -> None:
    num = 0
    for segments in (1, 2):
        for reduced in (1, 2, 4):
            for seed in (0, 1):
                write_job(
                    tmp_path,
                    num,
                    {"model.segments": segments, "model.reduced_dim": reduced, "seed": seed},
                    0.5 + 0.1 * segments + 0.01 * reduced + 0.001 * seed,
                )
                num += 1
    paths = summarize(tmp_path)
    text = paths["table"].read_text()
    grid = text[text.index("(rows) x") :].splitlines()
    assert grid[2] == "| model.reduced_dim / model.segments | 1 | 2 |"  # first axis down, second across
    assert grid[4].startswith("| 1 | 0.6105 ± 0.0007 | 0.7105 ± 0.0007 |")
    assert "0.6105 ± 0.0007" in text  # segments 1, reduced_dim 1: seeds 0 and 1
    assert paths["plot"].stat().st_size > 1000


def test_a_summary_never_writes_through_links_and_keeps_job_text_in_its_cell(tmp_path: Path) -> None:
    """A sweep folder is someone's: `sweep.md`/`.json`/`.png` planted as links to files outside it (and a
    planted temporary name) are replaced, their targets untouched; a job's error text cannot add rows or markup."""
    sweep, outside = tmp_path / "sweep", tmp_path / "outside"
    outside.mkdir()
    for num, acc in enumerate([0.5, 0.6]):
        write_job(sweep, num, {"model.segments": num + 1}, acc)
    write_job(sweep, 2, {"model.segments": 4}, 0.0, status="failed")
    failed = json.loads((sweep / "2_job" / "results.json").read_text())
    failed["error"] = "ValueError: bad\n| 9_forged | 1 | finished | 0.9999 |\n<img src=x>"
    (sweep / "2_job" / "results.json").write_text(json.dumps(failed))
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        (outside / name).write_text("precious")
        (sweep / name).symlink_to(outside / name)
    (outside / "planted").write_text("precious")
    (sweep / f".sweep.md.{os.getpid()}.tmp").symlink_to(outside / "planted")
    paths = summarize(sweep)
    assert all((outside / n).read_text() == "precious" for n in ("sweep.md", "sweep.json", "sweep.png", "planted"))
    assert not any(p.is_symlink() for p in paths.values())
    lines = paths["table"].read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith("| ")][1:] == ["| 0_job", "| 1_job", "| 2_job"]
    (failure,) = [line for line in lines if line.startswith("- ")]
    assert failure == "- 2_job failed: ValueError: bad \\| 9_forged \\| 1 \\| finished \\| 0.9999 \\| &lt;img src=x&gt;"


def test_a_sweep_preset_runs_side_by_side_in_fast_debug_mode(tmp_path: Path) -> None:
    """`sweep=mixing` (seeds narrowed on the command line) with two jobs at once on the CPU: both finish,
    each with half of the cores, and the summary holds both settings."""
    run_script(
        "train.py",
        # 40 steps an epoch: each job runs for seconds, longer than the second worker takes to start
        ["-m", "sweep=mixing", "seed=0", "hydra/launcher=parallel", "debug=fast", "trainer.limit_train_batches=40"]
        + ["run_name=preset", *QUIET],
        tmp_path,
    )
    sweep = tmp_path / "logs" / "train" / "multiruns" / "preset"
    report = json.loads((sweep / "sweep.json").read_text())
    assert report["swept"] == ["model.mixing"]
    results = {r["overrides"]["model.mixing"]: r for r in report["jobs"]}
    assert set(results) == {"dynamic", "static"} and {r["status"] for r in results.values()} == {"finished"}
    assert results["static"]["num_params"] < results["dynamic"]["num_params"]
    assert all(r["torch_threads"] == max(1, os.cpu_count() // 2) for r in results.values())
    spans = [(datetime.fromisoformat(r["started"]).timestamp(), r["wall_s"]) for r in results.values()]
    (a, a_wall), (b, b_wall) = spans
    assert a < b + b_wall and b < a + a_wall, spans  # they overlapped in time
    # each job's logged config says where it sits in the sweep (what W&B groups and compares by): the swept
    # values only, not the command line's other overrides
    for mixing, result in results.items():
        logged = yaml.safe_load((Path(result["output_dir"]) / "csv" / "hparams.yaml").read_text())["sweep"]
        assert logged["name"] == "preset" and logged["values"] == {"model.mixing": mixing, "seed": 0}
        assert logged["setting"] == f"model.mixing={mixing}"


def test_optuna_search_samples_the_space_and_reports_the_best(tmp_path: Path) -> None:
    run_script(
        "train.py",
        ["-m", "sweep=search", "hydra.sweeper.n_trials=2", "debug=fast", "run_name=search", *QUIET],
        tmp_path,
    )
    sweep = tmp_path / "logs" / "train" / "multiruns" / "search"
    jobs = collect(sweep)
    assert len(jobs) == 2 and {j["status"] for j in jobs} == {"finished"}
    for job in jobs:  # sampled inside the configured space
        assert 3e-4 <= job["overrides"]["optimizer.lr"] <= 1e-2
        assert 1e-3 <= job["overrides"]["optimizer.weight_decay"] <= 0.2
        assert 0.0 <= job["overrides"]["model.drop_path_rate"] <= 0.2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(j["best"]["val/acc1"] for j in jobs)


def test_a_sweep_run_again_leaves_its_jobs_folders_alone_and_lists_early_failures(tmp_path: Path) -> None:
    """`seed=1,abc`: the second job fails before it trains (a seed that is no integer) and is still a row of
    the summary; the same sweep started again refuses each finished job's folder and writes nothing into it."""
    args = ["-m", "seed=1,abc", "debug=fast", "run_name=again", *QUIET]
    run_script("train.py", args, tmp_path)
    sweep = tmp_path / "logs" / "train" / "multiruns" / "again"
    report = json.loads((sweep / "sweep.json").read_text())
    statuses = {str(r["overrides"]["seed"]): r["status"] for r in report["jobs"]}
    assert statuses == {"1": "finished", "abc": "failed"}, statuses
    assert "seed=abc is not an integer" in (sweep / "sweep.md").read_text()
    finished = next(p for p in sweep.iterdir() if p.name.startswith("0_"))
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file() and p.name != "train.log"}
    run_script("train.py", args, tmp_path)
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file() and p.name != "train.log"} == before
