"""Kill a training run with SIGKILL at random moments, restart it with the same command after each kill,
and check that it ends bit-identical to an uninterrupted run of that command.

    python benchmarks/chaos_resume.py --kills 20
    python benchmarks/chaos_resume.py --kills 3 -- trainer.max_epochs=2 hardware=cpu trainer.devices=2

The command is `python train.py run_name=<name> ckpt_path=auto <randomness> <overrides>`: every source of
randomness of the paper's recipe (`RECIPE_RANDOMNESS`: drop path, mixup/cutmix, RandAugment, random erasing)
on the default digits model, then the overrides (default below: 2 loader workers, a checkpoint every 10
steps, 10 epochs). Each restart is killed a
random 0-`--max-delay` seconds after it has written a checkpoint beyond the one it resumed from, so every
restart makes progress and the kills land anywhere: in training steps, validation, or a checkpoint write.
A kill takes the whole process group, as a scheduler does (DDP ranks included). Compared with
`torch.equal`: the raw and EMA weights, the optimizer state and the global step of the final
`checkpoints/last.ckpt`. Exit status 0 when all are identical.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from reporting import write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = [
    "trainer.deterministic=true",
    "data.num_workers=2",
    "callbacks.last_checkpoint.every_n_train_steps=10",
    "trainer.max_epochs=10",
]
# what draws random numbers in the paper's recipe (docs/paper.md, section 4), on top of the default run
RECIPE_RANDOMNESS = [
    "model.drop_path_rate=0.1",
    "module/mixup=paper",
    "+data.train_aug.auto_augment=rand-m9-mstd0.5-inc1",
    "+data.train_aug.re_prob=0.25",
    "+data.train_aug.re_mode=pixel",
]
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]


def start(workdir: Path, run_name: str, overrides: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "train.py"), f"run_name={run_name}", "ckpt_path=auto", *overrides, *QUIET]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "DYNAMIXER_TRACES_ASKED")}
    return subprocess.Popen(
        command,
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"train.py exited with {proc.returncode}:\n{err[-4000:]}")


def saved_step(path: Path) -> int:
    """The step of the checkpoint at `path`; -1 while there is none."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except FileNotFoundError:
        return -1


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Which of weights (raw, EMA) and optimizer state differ between two checkpoints."""
    first, second = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    parts = {
        "raw_weights": lambda c: {k: v for k, v in c["state_dict"].items() if k.startswith("model.")},
        "ema_weights": lambda c: {k: v for k, v in c["state_dict"].items() if k.startswith("ema.")},
        "optimizer": lambda c: tensors(c["optimizer_states"]),
    }
    report: dict[str, Any] = {"global_step": [first["global_step"], second["global_step"]]}
    for name, select in parts.items():
        x, y = select(first), select(second)
        differ = sorted(k for k in x.keys() | y.keys() if k not in x or k not in y or not torch.equal(x[k], y[k]))
        report[name] = {"tensors": len(x), "differ": differ[:10], "identical": not differ and len(x) > 0}
    report["identical"] = first["global_step"] == second["global_step"] and all(report[n]["identical"] for n in parts)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--max-delay", type=float, default=3.0, help="a kill comes up to this many s after a save")
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "overrides", nargs="*", help="train.py overrides (after --), default: " + " ".join(DEFAULT_OVERRIDES)
    )
    args = ap.parse_args(argv)
    overrides = [*RECIPE_RANDOMNESS, *(args.overrides or DEFAULT_OVERRIDES)]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos_resume_"))
    rng = random.Random(args.seed)

    began = time.monotonic()
    finish(start(workdir, "straight", overrides))
    straight_s = time.monotonic() - began
    print(f"uninterrupted run: {straight_s:.0f} s")

    kills, began, step = [], time.monotonic(), -1
    last = workdir / "logs/train/runs/killed/checkpoints/last.ckpt"
    for k in range(args.kills):
        proc = start(workdir, "killed", overrides)
        while saved_step(last) <= step and proc.poll() is None:  # until this restart has saved something new
            time.sleep(0.05)
        if proc.poll() is not None:
            finish(proc)
            print(f"kill {k + 1}: the run finished first")
            break
        delay = rng.uniform(0.0, args.max_delay)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        step = saved_step(last)
        kills.append({"after_save_s": round(delay, 2), "last_ckpt_step": step})
        print(f"kill {k + 1}: {delay:.2f} s after a save, last.ckpt at step {step}")
    finish(start(workdir, "killed", overrides))
    chaos_s = time.monotonic() - began

    report = {
        "command": f"python train.py run_name=<name> ckpt_path=auto {' '.join(overrides)}",
        "kills": kills,
        "uninterrupted_s": round(straight_s, 1),
        "with_kills_s": round(chaos_s, 1),
        **compare(*(workdir / f"logs/train/runs/{n}/checkpoints/last.ckpt" for n in ("straight", "killed"))),
    }
    print(f"{len(kills)} kills; final last.ckpt bit-identical to the uninterrupted run's: {report['identical']}")
    for name in ("raw_weights", "ema_weights", "optimizer"):
        print(f"  {name}: {report[name]['tensors']} tensors, identical: {report[name]['identical']}")
    write_report(report, args.json)
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
