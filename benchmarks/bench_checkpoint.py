"""What a resumable checkpoint costs: its size and the time of one whole, fsynced save (`atomic_torch_save`,
what training uses), per model, and the share of training time that saving at an interval takes.

    python benchmarks/bench_checkpoint.py --models s l --interval-min 30 --json benchmarks/results/checkpoint_cpu.json

The checkpoint holds what a training checkpoint holds: the raw and EMA weights and AdamW's two moments
(after one real optimizer step), so its size is that of `last.ckpt` of a real run. The folder is the
one training writes to in this benchmark's `--dir` (default: a temporary folder on this machine's disk).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import dynamixer  # noqa: F401  (registers the models with timm)
from dynamixer.machinery.checkpoint_io import atomic_torch_save
from reporting import write_report


def training_checkpoint(name: str) -> dict:
    """Weights, EMA weights and AdamW state of `dynamixer_<name>` after one optimizer step."""
    model = timm.create_model(f"dynamixer_{name}")
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    ema = copy.deepcopy(model)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {f"ema.module.{k}": v for k, v in ema.state_dict().items()}
    return {"state_dict": state, "optimizer_states": [optimizer.state_dict()], "global_step": 1}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["s", "l"], choices=["tiny", "s", "m", "l"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--interval-min", type=float, default=30.0, help="the checkpoint interval to report on")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))

    results = []
    for name in args.models:
        checkpoint = training_checkpoint(name)
        path = folder / f"{name}" / "last.ckpt"
        seconds = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            atomic_torch_save(checkpoint, path)
            seconds.append(time.perf_counter() - began)
        median = statistics.median(seconds)
        row = {
            "model": f"dynamixer_{name}",
            "size_mb": path.stat().st_size / 2**20,
            "save_s_median": median,
            "save_s_range": [min(seconds), max(seconds)],
            "overhead_at_interval": median / (args.interval_min * 60),
        }
        results.append(row)
        print(
            f"{row['model']}: {row['size_mb']:.0f} MB, save {median:.2f} s (median of {args.repeats}), "
            f"{row['overhead_at_interval']:.3%} of training time at one save per {args.interval_min:g} min"
        )
        del checkpoint
    write_report({"interval_min": args.interval_min, "folder": str(folder), "results": results}, args.json)


if __name__ == "__main__":
    main()
