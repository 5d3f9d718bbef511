"""Throughput, memory and FLOP efficiency of DynaMixer against its literal reference implementation.

For one variant, batch size, image size and device, and for each precision (fp32, bf16-mixed) and
compile setting asked for, it times on the same inputs, interleaved round-robin so that a noisy
machine slows all of them alike:

- `forward`: `model(x)` under `torch.no_grad()` in eval mode;
- `train`: forward, cross-entropy, backward (train mode; gradients zeroed by setting them to None);

for our model (`dynamixer.models.DynaMixer`), our model under `torch.compile(fullgraph=True)` and
with per-stage activation checkpointing when asked, and the reference (`tests/reference_model.py`,
docs/paper.md sections 1-3 transcribed literally, same weights). It reports images/s (median over the timed repeats,
and min-max), the peak memory of one training step, GMACs per image (`torch.utils.flop_counter`),
the achieved GFLOP/s, the ratio to a square-matmul peak measured in the same run on the same device
and dtype, and our/reference ratios. To show what limits a step, it replays the step's matrix
products alone (same shapes and dtypes): their GFLOP/s is the ceiling the step would reach if all
its other work took no time, and their share of the step is what fusing that other work can win.
It prints tables and writes every number to a JSON file.

    python benchmarks/bench_model.py --model s --batch-size 8 --img-size 224 \
        --precision fp32 bf16-mixed --compile off --json benchmarks/results/s_b8_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import weakref
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dynamixer  # noqa: F401  (registers the models with timm)
from dynamixer.utils.complexity import count_flops
from reporting import write_report

# the literal reference is a test oracle: it lives with the tests, not in the installable package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_model import reference_from  # noqa: E402

VARIANTS = {"tiny": "dynamixer_tiny", "s": "dynamixer_s", "m": "dynamixer_m", "l": "dynamixer_l"}


# ------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def forward_fn(model: nn.Module, x: torch.Tensor, precision: str):
    def run():
        with torch.no_grad(), autocast(x.device, precision):
            return model(x)

    return run


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str):
    def run():
        with autocast(x.device, precision):
            loss = F.cross_entropy(model(x).float(), y)  # in fp32, as the training module does
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    return run


def time_interleaved(
    fns: dict[str, callable], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each function: `warmup` untimed calls each, then `repeats` rounds in which
    every function runs once (round-robin, so slow phases of a shared machine hit all of them)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created by the ops run under it and still alive (CPU or any
    device): the memory a training step needs on top of what existed before it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen and storage.nbytes() > 0:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def peak_memory(fn: callable, device: torch.device) -> int:
    """Peak bytes allocated by one call of `fn` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = PeakMemory()
    with tracker:
        fn()
    return tracker.peak


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """GFLOP/s of an `n x n` by `n x n` matmul (best of `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class GemmRecorder(TorchDispatchMode):
    """Records every matrix product (`mm`, `addmm`, `bmm`, `baddbmm`) run under it: op, operand
    shapes and dtype, after autocast's casts."""

    OPS = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.baddbmm.default,
    }

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            key = (func, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), args[-1].dtype)
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def gemm_ceiling(fn: callable, device: torch.device, repeats: int = 3) -> dict:
    """The matrix products of one call of `fn`, replayed alone on fresh contiguous operands of the
    same shapes and dtype: their FLOPs, their seconds (median of `repeats` per shape, times its
    count) and so the GFLOP/s the step could reach if everything else took no time."""
    recorder = GemmRecorder()
    with recorder:
        fn()
    flops = seconds = 0.0
    for (func, shapes, dtype), count in recorder.calls.items():
        operands = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
        m, k = shapes[-2][-2:]
        n = shapes[-1][-1]
        batch = shapes[-1][0] if len(shapes[-1]) == 3 else 1
        func(*operands)
        ts = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            func(*operands)
            sync(device)
            ts.append(time.perf_counter() - t0)
        flops += 2 * batch * m * k * n * count
        seconds += statistics.median(ts) * count
    return {
        "gemm_gflop": flops / 1e9,
        "gemm_seconds": seconds,
        "gemm_gflop_s": flops / seconds / 1e9,
        "gemm_calls": sum(recorder.calls.values()),
    }


# -------------------------------------------------------------------------------------- running
def build(name: str, img_size: int, num_classes: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=img_size, num_classes=num_classes).to(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(VARIANTS), default="s")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=None, help="default: the variant's (224; tiny: 32)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16-mixed"], default=["fp32", "bf16-mixed"])
    ap.add_argument(
        "--compile",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help="'on' also times our model under torch.compile(fullgraph=True)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", nargs="+", choices=["forward", "train"], default=["forward", "train"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference implementation")
    ap.add_argument(
        "--grad-checkpointing",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help="'on' also times the training step of our model with per-stage activation checkpointing",
    )
    ap.add_argument("--no-gemm", action="store_true", help="skip replaying the step's matrix products alone")
    ap.add_argument("--matmul-size", type=int, default=None, help="square matmul for the peak (cpu 2048, cuda 8192)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = VARIANTS[args.model]
    img_size = args.img_size or timm.models.get_pretrained_cfg(name).input_size[-1]
    model = build(name, img_size, args.num_classes, device)
    torch.manual_seed(1)
    x = torch.randn(args.batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks = {"fp32": matmul_peak(device, torch.float32, n), "bf16-mixed": matmul_peak(device, torch.bfloat16, n)}
    ref = None if args.no_reference else reference_from(model)
    flops = {
        (impl, mode): count_flops(m, tuple(x.shape), train=mode == "train")
        for impl, m in (("our", model), ("reference", ref))
        if m is not None
        for mode in ("forward", "train")
    }
    gmacs = flops[("our", "forward")] / 2e9 / args.batch_size

    impls: dict[str, nn.Module] = {"our": model}
    compile_started = None
    if "on" in args.compile:
        compile_started = time.perf_counter()  # compiling happens in the warm-up calls below
        impls["our+compile"] = torch.compile(model, fullgraph=True)
    if "on" in args.grad_checkpointing:
        impls["our+ckpt"] = copy.deepcopy(model)
        impls["our+ckpt"].set_grad_checkpointing(True)
    if ref is not None:
        impls["reference"] = ref
    if "off" not in args.compile:
        impls.pop("our")

    fns = {}
    for mode in args.modes:
        for precision in args.precision:
            for impl, m in impls.items():
                if impl == "our+ckpt" and mode == "forward":
                    continue  # checkpointing only changes what training keeps for backward
                fn = forward_fn(m, x, precision) if mode == "forward" else train_fn(m, x, y, precision)
                fns[(impl, mode, precision)] = fn
    # warm-up (compiles once per mode/precision) apart from the timed rounds
    for key, fn in fns.items():
        impls[key[0]].train(key[1] == "train")
        fn()
    compile_seconds = None if compile_started is None else time.perf_counter() - compile_started

    def run(key):
        impls[key[0]].train(key[1] == "train")
        return fns[key]()

    times = time_interleaved({k: (lambda k=k: run(k)) for k in fns}, device, max(0, args.warmup - 1), args.repeats)

    results = []
    for key, ts in times.items():
        impl, mode, precision = key
        impls[impl].train(mode == "train")
        # the CPU tracker is a dispatch mode, which torch.compile cannot trace: eager models only there
        measurable = mode == "train" and (device.type == "cuda" or impl != "our+compile")
        mem = peak_memory(fns[key], device) if measurable else None
        # what limits the step: its own matrix products alone (eager models; a dispatch mode again)
        gemm = gemm_ceiling(fns[key], device) if impl in ("our", "reference") and not args.no_gemm else None
        med = statistics.median(ts)
        flop = flops[("reference" if impl == "reference" else "our", mode)]
        gflops = flop / med / 1e9
        results.append(
            {
                "impl": impl,
                "mode": mode,
                "precision": precision,
                "median_s": med,
                "min_s": min(ts),
                "max_s": max(ts),
                "images_per_s": args.batch_size / med,
                "images_per_s_range": [args.batch_size / max(ts), args.batch_size / min(ts)],
                "peak_memory_mb": None if mem is None else mem / 2**20,
                "gflop_per_step": flop / 1e9,
                "achieved_gflop_s": gflops,
                "peak_fraction": gflops / peaks[precision],
                "gemm": None
                if gemm is None
                else {
                    **gemm,
                    "peak_fraction": gemm["gemm_gflop_s"] / peaks[precision],
                    "share_of_step": gemm["gemm_seconds"] / med,
                },
            }
        )
    ref_fp32 = {r["mode"]: r["images_per_s"] for r in results if r["impl"] == "reference" and r["precision"] == "fp32"}
    same = {(r["mode"], r["precision"]): r["images_per_s"] for r in results if r["impl"] == "reference"}
    eager = {(r["mode"], r["precision"]): r["images_per_s"] for r in results if r["impl"] == "our"}
    for r in results:
        r["vs_reference_same_precision"] = r["images_per_s"] / same[(r["mode"], r["precision"])] if same else None
        r["vs_reference_fp32"] = r["images_per_s"] / ref_fp32[r["mode"]] if ref_fp32 else None
        r["vs_our_eager"] = r["images_per_s"] / eager[(r["mode"], r["precision"])] if eager else None

    report = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "img_size": img_size,
            "model_name": name,
        },
        "machine": {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_1_5_15min_at_end": os.getloadavg(),
        },
        "gmacs_per_image": gmacs,
        "matmul_peak_gflop_s": peaks,
        "matmul_size": n,
        "compile_seconds": compile_seconds,
        "results": results,
    }
    print_table(report)
    write_report(report, args.json)
    return report


def print_table(report: dict) -> None:
    c = report["config"]
    print(
        f"\n{c['model_name']} batch {c['batch_size']} img {c['img_size']} on {report['machine']['device']} "
        f"({report['machine']['threads']} threads, torch {report['machine']['torch']}); "
        f"{report['gmacs_per_image']:.2f} GMACs/image; matmul peak (n={report['matmul_size']}): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_peak_gflop_s"].items())
        + "; load average {:.1f} {:.1f} {:.1f}".format(*report["machine"]["load_average_1_5_15min_at_end"])
    )
    if report["compile_seconds"] is not None:
        print(f"torch.compile + first calls: {report['compile_seconds']:.0f} s")
    head = (
        f"{'impl':<12} {'mode':<8} {'precision':<10} {'img/s':>8} {'(min-max)':>15} {'peak MB':>8} "
        f"{'GFLOP/s':>8} {'of peak':>7} {'/ref':>6} {'/ref32':>6} {'/eager':>6}"
    )
    print(head)
    print("-" * len(head))

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-".rjust(len(format(1.0, spec)))

    for r in report["results"]:
        lo, hi = r["images_per_s_range"]
        print(
            f"{r['impl']:<12} {r['mode']:<8} {r['precision']:<10} {r['images_per_s']:8.2f} "
            f"{f'({lo:.2f}-{hi:.2f})':>15} "
            f"{fmt(r['peak_memory_mb'], '8.0f')} {r['achieved_gflop_s']:8.1f} {r['peak_fraction']:7.1%} "
            f"{fmt(r['vs_reference_same_precision'], '6.2f')} {fmt(r['vs_reference_fp32'], '6.2f')} "
            f"{fmt(r['vs_our_eager'], '6.2f')}"
        )
    gemms = [r for r in report["results"] if r.get("gemm")]
    if gemms:
        print("\nmatrix products of each step replayed alone (same shapes and dtypes, fresh operands):")
        head = (
            f"{'impl':<12} {'mode':<8} {'precision':<10} {'calls':>6} {'GFLOP':>7} {'GFLOP/s':>8} "
            f"{'of peak':>7} {'of step':>7}"
        )
        print(head)
        print("-" * len(head))
        for r in gemms:
            g = r["gemm"]
            print(
                f"{r['impl']:<12} {r['mode']:<8} {r['precision']:<10} {g['gemm_calls']:6d} {g['gemm_gflop']:7.1f} "
                f"{g['gemm_gflop_s']:8.1f} {g['peak_fraction']:7.1%} {g['share_of_step']:7.1%}"
            )


if __name__ == "__main__":
    main()
