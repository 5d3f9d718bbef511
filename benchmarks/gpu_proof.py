"""The GPU proof of issue 20 in one command: what a lent GPU must show, measured in one run and written as one
JSON file (`gpu_proof.json`) and one markdown table (`gpu_proof.md`) in `--out`.

Sections, in this order (each guarded: a failure is recorded with its traceback and the next one runs; a section
that would overrun `--budget-s` is recorded as skipped, with the reason):

- `parity_cpu`: logits of dynamixer_s/m/l in fp32 (TF32 off) on the device against the CPU in fp32 (bound
  1e-4 relative) and, as the oracle of both, in fp64;
- `throughput_eager`: training (forward, cross-entropy, backward, SGD step) and inference (`no_grad`, eval) img/s of
  dynamixer_s/m/l and timm's sequencer2d_s, resmlp_36_224 and mixer_b16_224 (pretrained=False) in bf16 autocast,
  and dynamixer_s in fp16 with the grad scaler (CUDA only); peak memory and the batch used (halved on OOM);
- `training_run`: `python train.py experiment=dynamixer_s_imagenet trainer.devices=1` for `--train-steps` steps on
  an image tree of crops of scikit-learn's sample photographs, three runs at once: an uninterrupted one, one
  stopped by SIGTERM after its mid-run checkpoint and resumed with `ckpt_path=auto` (same final weights, EMA and
  optimizer state, `torch.equal`), and a short one that counts the host reads (`aten._local_scalar_dense`:
  `.item()`, `bool(t)`) and, on CUDA, the syncs `torch.cuda.set_sync_debug_mode("warn")` reports, per step of its
  main process; finite losses and the logged `train/throughput`;
- `parity_compile`: `torch.compile(fullgraph=True)` against eager, logits and every parameter's gradient in fp32
  (the softmax over dim -2 is what PyTorch's attention-pattern rewrite has mis-compiled before);
- `throughput_compiled`: the rows of `throughput_eager` under `torch.compile`, models in `--compile-models`
  order, each started only while `--compile-reserve-s` of the budget is left;
- `fused_mix`: the Triton kernel of the DynaMixer op (`model.fused_mix`) against the PyTorch op, on the op of
  dynamixer_s's first stage (32 tokens, 192 channels, 8 segments): output and gradients against the PyTorch
  op's in fp32 (bound 1e-4 relative; under bf16 and fp16 autocast no further from it than the PyTorch op),
  bf16 forward and training (forward and backward) time and peak memory of the op, and dynamixer_s's bf16
  training img/s with and without it (on the CPU only with `TRITON_INTERPRET=1`: Triton's interpreter);
- `goals`: dynamixer_s training img/s x GMACs against sequencer2d_s's (goal: at least 1x), compiled against eager
  (goal: at least 1.3x), the fused op's training step against the PyTorch op's (goal: at least 2x).

    python benchmarks/gpu_proof.py --out benchmarks/results/gpu_proof          # a CUDA device, at most 8 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_proof.py --device cpu --tiny --out gpu_proof_cpu   # every section, CPU

`--tiny` shrinks everything (28/32 px images, batch 2; the training runs: 16 steps of the experiment with
`model=dynamixer_tiny`; the compiled rows and parity: `dynamixer_tiny` only, compiled with `aot_eager`, as a CPU
inductor compile takes minutes) to prove the script, not the figures.
No network: every model is built with random weights.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from chaos_resume import compare, saved_step
from PIL import Image

import dynamixer  # noqa: F401  (registers the models with timm)
from reporting import write_report

REPO = Path(__file__).resolve().parents[1]
# name -> (image size of the proof, of --tiny); the timm models need a multiple of their patch (16) or stem (7)
MODELS = {
    "dynamixer_s": (224, 28),
    "dynamixer_m": (224, 28),
    "dynamixer_l": (224, 28),
    "sequencer2d_s": (224, 28),
    "resmlp_36_224": (224, 32),
    "mixer_b16_224": (224, 32),
}
TINY_COMPILED = {"dynamixer_tiny": 32}  # --tiny compiles only this one (about 25 s of aot_eager on a 2-core CPU)
# GMACs per 224x224 image: the issue's figures (timm's benchmark table; ours: docs/paper.md, section 3)
GMACS_224 = {
    "dynamixer_s": 7.30,
    "dynamixer_m": 17.0,
    "dynamixer_l": 27.3,
    "sequencer2d_s": 4.96,
    "resmlp_36_224": 8.91,
    "mixer_b16_224": 12.62,
}
CPU_PARITY_BOUND = 1e-4  # relative (Frobenius) error of the device's fp32 logits against the CPU's
COMPILE_PARITY_BOUND = 1e-3  # compiled vs eager, logits and each gradient, fp32: a mis-compile is of order 1
FUSED_PARITY_BOUND = 1e-4  # the fused op vs the PyTorch op, fp32 (TF32 off), output and each gradient
# the op of the first stage (tokens per line, channels, segments, reduced dim) of dynamixer_s, and of --tiny's model
FUSED_OP = {"dynamixer_s": (32, 192, 8, 2), "dynamixer_tiny": (8, 64, 4, 2)}
EXPERIMENT = ["experiment=dynamixer_s_imagenet", "trainer.devices=1"]
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]
CUDA_ONLY_FP16 = "CUDA only: fp16 autocast with the grad scaler is the CUDA mixed precision (16-mixed)"


# ------------------------------------------------------------------------------------ the report
class Budget:
    """Seconds left until the deadline `seconds` after it was made."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def failure(err: BaseException) -> dict[str, str]:
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def run_section(
    report: dict, name: str, fn: Callable[[], dict], budget: Budget, need_s: float = 0.0, skip: str | None = None
) -> dict:
    """`fn()`'s dict as `report["sections"][name]`, with `status` ok, failed (the error and the end of its
    traceback) or skipped (`skip`, or fewer than `need_s` seconds of the budget left), and its seconds."""
    began = time.monotonic()
    if skip is None and budget.left() < need_s:
        skip = f"time budget: {budget.left():.0f} s left, the section needs about {need_s:.0f} s"
    if skip is not None:
        entry = {"status": "skipped", "reason": skip}
    else:
        print(f"--- {name} ({budget.left():.0f} s of the budget left)", flush=True)
        try:
            entry = {"status": "ok", **fn()}
        except Exception as err:  # recorded; the next section still runs
            entry = {"status": "failed", **failure(err)}
    entry["seconds"] = round(time.monotonic() - began, 1)
    report["sections"][name] = entry
    print(f"--- {name}: {entry['status']} in {entry['seconds']} s {entry.get('reason') or entry.get('error') or ''}")
    free_memory()
    return entry


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 (cuDNN's convolutions use it by default)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """`|a - b| / |b|` (Frobenius norms), in fp64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def build(name: str, img_size: int, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """`name` with random weights (the same for a seed) for `img_size` images, its default classes, on `device`."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, img_size=img_size).to(device)


def perturbed(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Noise on every parameter: the default init gives near-uniform mixing matrices and zero biases, which
    would hide errors in the generated matrices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * std)
    return model


# -------------------------------------------------------------------------------------- parity
def parity_cpu(device: torch.device, tiny: bool) -> dict:
    """Each DynaMixer's fp32 logits on `device` vs the CPU's (fp32, and fp64 as the oracle of both)."""
    batch = 2 if tiny else 8
    rows = []
    for name in ("dynamixer_s", "dynamixer_m", "dynamixer_l"):
        img = MODELS[name][1 if tiny else 0]
        model = perturbed(build(name, img, torch.device("cpu"))).eval()
        x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), exact_fp32():
            cpu = model(x)
            on_device = model.to(device)(x.to(device)).cpu()
            fp64 = model.cpu().double()(x.double())
        err = rel_err(on_device, cpu)
        rows.append(
            {
                "model": name,
                "img_size": img,
                "batch": batch,
                "rel_err_vs_cpu_fp32": err,
                "device_rel_err_vs_fp64": rel_err(on_device, fp64),
                "cpu_rel_err_vs_fp64": rel_err(cpu, fp64),
                "passed": err < CPU_PARITY_BOUND,
            }
        )
        del model
    return {"bound": CPU_PARITY_BOUND, "rows": rows, "passed": all(r["passed"] for r in rows)}


def parity_compile(device: torch.device, name: str, img: int, backend: str) -> dict:
    """`torch.compile(fullgraph=True)` against eager on the same weights and batch (fp32, train mode): the
    logits and every parameter's gradient of a cross-entropy step."""
    model = perturbed(build(name, img, device)).train()
    batch = 2 if device.type == "cpu" else 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, img, img, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)

    def step(fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = fn(x)
        F.cross_entropy(logits, y).backward()
        return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    with exact_fp32():
        eager_logits, eager_grads = step(model)
        began = time.monotonic()
        compiled_logits, compiled_grads = step(torch.compile(model, fullgraph=True, dynamic=False, backend=backend))
        compile_s = time.monotonic() - began
    grad_errs = {n: rel_err(compiled_grads[n], eager_grads[n]) for n in eager_grads}
    worst = max(grad_errs, key=grad_errs.get)
    logits_err = rel_err(compiled_logits, eager_logits)
    return {
        "model": name,
        "img_size": img,
        "batch": batch,
        "backend": backend,
        "compile_s": round(compile_s, 1),
        "bound": COMPILE_PARITY_BOUND,
        "logits_rel_err": logits_err,
        "grads_rel_err_max": grad_errs[worst],
        "grads_rel_err_worst_param": worst,
        "grads_compared": len(grad_errs),
        "passed": logits_err < COMPILE_PARITY_BOUND and grad_errs[worst] < COMPILE_PARITY_BOUND,
    }


# ---------------------------------------------------------------------------------- throughput
def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def measure(
    model: torch.nn.Module,
    runner: Callable,
    mode: str,
    precision: str,
    batch: int,
    img: int,
    device: torch.device,
    warmup: int,
    iters: int,
) -> dict:
    """img/s of `iters` calls of a training step (forward, cross-entropy in fp32, backward, SGD step; fp16 through
    the grad scaler) or an inference call (eval, `no_grad`) of `runner` (the model, or it compiled) at `batch`,
    after `warmup` calls (the first compiles); peak memory allocated (CUDA) over all of them."""
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    model.train(mode == "train")
    if mode == "train":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

        def call():
            with autocast(device, precision):
                loss = F.cross_entropy(runner(x).float(), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)

    else:

        def call():
            with torch.no_grad(), autocast(device, precision):
                runner(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    call()
    sync(device)
    first_s = time.perf_counter() - began
    for _ in range(warmup - 1):
        call()
    sync(device)
    began = time.perf_counter()
    for _ in range(iters):
        call()
    sync(device)
    seconds = (time.perf_counter() - began) / iters
    return {
        "batch": batch,
        "images_per_s": batch / seconds,
        "step_s": seconds,
        "first_call_s": round(first_s, 2),
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def row_configs(name: str) -> list[tuple[str, str]]:
    """(mode, precision) of a model's rows: bf16 training and inference; fp16 training for dynamixer_s."""
    return [("train", "bf16"), ("infer", "bf16")] + ([("train", "fp16")] if name == "dynamixer_s" else [])


def throughput(
    models: dict[str, int],
    compiled: bool,
    args: argparse.Namespace,
    device: torch.device,
    budget: Budget,
) -> dict:
    """One row per model and (mode, precision): img/s, img/s x GMACs, peak memory, the batch used (halved after
    an out-of-memory error); each row guarded, compiled rows started only while `--compile-reserve-s` is left."""
    rows = []
    for name, img in models.items():
        model = runner = None
        for mode, precision in row_configs(name):
            row = {"model": name, "mode": mode, "precision": precision, "compiled": compiled, "img_size": img}
            rows.append(row)
            if precision == "fp16" and device.type != "cuda":
                row.update(status="skipped", reason=CUDA_ONLY_FP16)
                continue
            if compiled and budget.left() < args.compile_reserve_s:
                row.update(status="skipped", reason=f"time budget: {budget.left():.0f} s left")
                continue
            began = time.monotonic()
            try:
                if model is None:
                    model = build(name, img, device)
                    if compiled:
                        torch._dynamo.reset()  # a fresh cache per model: no silent eager fallback at its size limit
                        # our models compile whole (as module.compile=true trains); timm's may break graphs (LSTM)
                        runner = torch.compile(
                            model, fullgraph=name.startswith("dynamixer"), dynamic=False, backend=args.compile_backend
                        )
                    else:
                        runner = model
                batch = args.batch if mode == "train" else args.infer_batch
                while True:
                    try:
                        row.update(measure(model, runner, mode, precision, batch, img, device, args.warmup, args.iters))
                        break
                    except torch.cuda.OutOfMemoryError:
                        if batch <= 8:
                            raise
                    # out of the except block: its traceback no longer holds the activations
                    batch //= 2
                    row["oom_retries"] = row.get("oom_retries", 0) + 1
                    model.zero_grad(set_to_none=True)
                    free_memory()
                gmacs = GMACS_224.get(name)
                row["gmacs_224"] = gmacs
                row["images_per_s_x_gmacs"] = row["images_per_s"] * gmacs if gmacs and not args.tiny else None
                row["status"] = "ok"
            except Exception as err:  # recorded; the next row still runs
                row.update(status="failed", **failure(err))
            row["seconds"] = round(time.monotonic() - began, 1)
            print(f"  {name} {mode} {precision} compiled={compiled}: {row['status']} {row.get('images_per_s', '')}")
            free_memory()
        del model, runner
        free_memory()
    statuses = [r["status"] for r in rows]
    return {
        "backend": args.compile_backend if compiled else None,
        "peak_memory": "torch.cuda.max_memory_allocated over the row's calls; not measured on the CPU",
        "rows": rows,
        "rows_by_status": {k: statuses.count(k) for k in sorted(set(statuses))},
    }


# ------------------------------------------------------------------------------------- fused op
def fused_mix_skip(device: torch.device) -> str | None:
    """Why the fused kernel cannot run on `device`, or None."""
    try:
        from dynamixer.models import fused_mix
    except ImportError as err:
        return f"Triton is not importable: {err}"
    if not fused_mix.runs_on(torch.empty(0, device=device)):
        return "the Triton kernels run on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1)"
    return None


def time_calls(call: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Seconds per call after `warmup` calls, and the peak memory (MB, CUDA) of one call above what was allocated."""
    for _ in range(warmup):
        call()
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    for _ in range(iters):
        call()
    sync(device)
    seconds = (time.perf_counter() - began) / iters
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def op_call(op: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, fused: bool, precision: str | None, train: bool):
    """One call of the DynaMixer op `op`, fused or not, under `precision`'s autocast (None: exact fp32): forward
    and backward of `dy` (`train`), or forward under `no_grad`. Returns the output and the gradients."""
    op.fused = fused
    op.zero_grad(set_to_none=True)
    x.grad = None
    with torch.set_grad_enabled(train), autocast(device=x.device, precision=precision) if precision else exact_fp32():
        y = op(x)
    if not train:
        return [y]
    y.float().backward(dy)
    return [y.detach(), x.grad, *(p.grad for p in op.parameters())]


def fused_op(args: argparse.Namespace, device: torch.device) -> dict:
    """The fused DynaMixer op against the PyTorch op (same weights, both token axes), then dynamixer_s with it."""
    from dynamixer.models import DynaMixerOp

    name = "dynamixer_tiny" if args.tiny else "dynamixer_s"
    n, c, segments, d = FUSED_OP[name]
    batch = 2 if args.tiny else 64
    rows = []
    for token_dim in (1, 2):
        torch.manual_seed(0)
        # weights far from the init's near-uniform matrices, which would hide errors in the generated ones
        op = perturbed(DynaMixerOp(c, n, segments, d, token_dim=token_dim), std=0.3).to(device)
        x = torch.randn(batch, n, n, c, device=device, requires_grad=True)
        dy = torch.randn(batch, n, n, c, device=device)
        exact = op_call(op, x, dy, False, None, True)  # the PyTorch op in fp32: the reference of every row
        row = {"token_dim": token_dim}
        for fused in (True, False):
            for precision in (None, "bf16", "fp16"):
                key = f"{'fused' if fused else 'pytorch'}_{precision or 'fp32'}_rel_err_max"
                row[key] = max(rel_err(a, b) for a, b in zip(op_call(op, x, dy, fused, precision, True), exact))
        # fp32 within the bound; in 16 bits no further from fp32 than the PyTorch op (the kernel's 16-bit dots)
        row["passed"] = row["fused_fp32_rel_err_max"] < FUSED_PARITY_BOUND and all(
            row[f"fused_{p}_rel_err_max"] <= 1.5 * row[f"pytorch_{p}_rel_err_max"] for p in ("bf16", "fp16")
        )
        for fused in (False, True):
            label = "fused" if fused else "pytorch"
            for train in (False, True):
                seconds, peak = time_calls(
                    lambda fused=fused, train=train: op_call(op, x, dy, fused, "bf16", train),  # noqa: B023
                    device,
                    args.warmup,
                    args.iters,
                )
                row[f"{label}_{'train' if train else 'forward'}_ms"] = 1e3 * seconds
                if train:
                    row[f"{label}_train_peak_mb"] = peak
        row["forward_speedup"] = row["pytorch_forward_ms"] / row["fused_forward_ms"]
        row["train_speedup"] = row["pytorch_train_ms"] / row["fused_train_ms"]
        rows.append(row)
    model_rows = []
    img = TINY_COMPILED[name] if args.tiny else MODELS[name][0]  # dynamixer_s at 224 on the GPU
    for fused in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=img, fused_mix=fused).to(device)
        r = measure(model, model, "train", "bf16", args.batch, img, device, args.warmup, args.iters)
        model_rows.append({"model": name, "fused_mix": fused, **r})
        del model
        free_memory()
    return {
        "op": {"model": name, "tokens": n, "channels": c, "segments": segments, "reduced_dim": d, "batch": batch},
        "bound": FUSED_PARITY_BOUND,
        "rows": rows,
        "model_rows": model_rows,
        "model_train_speedup": model_rows[1]["images_per_s"] / model_rows[0]["images_per_s"],
        "passed": all(r["passed"] for r in rows),
    }


# -------------------------------------------------------------------------------- training run
def write_sample_tree(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int) -> Path:
    """An ImageNet-layout tree `root/{train,val}/<wnid>/*.JPEG` of `size` x `size` JPEG crops of scikit-learn's two
    sample photographs (real photographs, installed with it): class k's crops come from the k-th of `classes`
    vertical bands of the photographs, so the classes differ in content."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8 arrays
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / f"n{k:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                photo = photos[i % len(photos)]
                height, band = photo.shape[0], photo.shape[1] // classes
                side = int(rng.integers(min(height, band) // 2, min(height, band) + 1))
                top = int(rng.integers(0, height - side + 1))
                left = k * band + int(rng.integers(0, band - side + 1))
                crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))
                crop.save(folder / f"n{k:08d}_{i:05d}.JPEG", quality=90)
    return root


def start_train(workdir: Path, run_name: str, overrides: list[str]) -> subprocess.Popen:
    """`python train.py run_name=<run_name> ckpt_path=auto <overrides>` in `workdir`, its output in `<run_name>.log`
    there (a file, not a pipe: a pipe nobody reads would block a talkative run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "DYNAMIXER_TRACES_ASKED")}
    command = [sys.executable, str(REPO / "train.py"), f"run_name={run_name}", "ckpt_path=auto", *overrides]
    with open(workdir / f"{run_name}.log", "a") as log:
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, workdir: Path, run_name: str, expect: int, timeout: float) -> None:
    try:
        code = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"train.py {run_name} ran past the time budget") from None
    if code != expect:
        tail = (workdir / f"{run_name}.log").read_text()[-3000:]
        raise RuntimeError(f"train.py {run_name} exited with {code}, not {expect}:\n{tail}")


def read_metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    """The logged per-step training losses and per-epoch throughputs of a run's `csv/metrics.csv`."""
    losses, throughput = [], []
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss_step"):
                losses.append(float(row["train/loss_step"]))
            if row.get("train/throughput"):
                throughput.append(float(row["train/throughput"]))
    return losses, throughput


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the raw weights of two checkpoints."""
    first, second = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first if k.startswith("model."))


def sync_counts(counts: dict, first: int, steps: int) -> dict:
    """Per-step counts of `HostSyncCounter` with their means."""
    reads, syncs = counts["host_reads"], counts["cuda_syncs"]
    return {
        "counted_steps": [first, first + steps - 1],
        "host_reads_per_step": reads,
        "host_reads_mean": sum(reads) / len(reads),
        "cuda_syncs_per_step": syncs,
        "cuda_syncs_mean": None if syncs is None else sum(syncs) / len(syncs),
        "cuda_syncs_skipped": "CUDA only: torch.cuda.set_sync_debug_mode reports CUDA synchronizations"
        if syncs is None
        else None,
    }


def training_run(args: argparse.Namespace, device: torch.device, out: Path, budget: Budget) -> dict:
    """The uninterrupted, the SIGTERM-stopped-and-resumed and the host-sync-counting runs of the experiment, the
    first two from the same command, all three at once (the logged throughput is that of a shared device)."""
    workdir = out / "training_run"
    workdir.mkdir(parents=True, exist_ok=True)
    classes, per_class = 4, args.train_images // 4
    began = time.monotonic()
    tree = write_sample_tree(workdir / "data", classes, per_class, max(2, per_class // 25), args.tree_img_size)
    tree_s = time.monotonic() - began
    steps = args.train_steps
    # the one save of the stopped run, which the SIGTERM follows: in the middle of the epoch that holds the run's
    # middle step, away from an epoch's end (a stop at an epoch's end resumed off in 2 CI runs: not understood)
    per_epoch = max(1, classes * per_class // args.train_batch)
    save_at = steps // 2 // per_epoch * per_epoch + per_epoch // 2
    overrides = [
        *EXPERIMENT,
        f"paths.root_dir={workdir}",
        f"data.data_dir={tree}",
        f"data.batch_size={args.train_batch}",
        f"data.num_workers={args.workers}",
        f"trainer.max_steps={steps}",
        "trainer.deterministic=warn",  # the resume must repeat the run; an op without a deterministic kernel warns
        # one save mid-run, which the SIGTERM follows (a 30-minute interval would never come)
        "callbacks.last_checkpoint.train_time_interval=null",
        f"callbacks.last_checkpoint.every_n_train_steps={save_at}",
        *QUIET,
    ]
    if device.type == "cpu":
        # fp16 autocast (16-mixed) is CUDA's; the strategy stays the experiment's (DDP, here over gloo)
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    if args.tiny:
        # the recipe as it is, on the small model: S's 26M parameters would make AdamW, EMA and 400 MB saves the run
        overrides += ["model=dynamixer_tiny"]
    first, counted = 3 if args.tiny else 10, 4 if args.tiny else 10
    counts_file = workdir / "host_syncs.json"
    counting = [
        *[o for o in overrides if not o.startswith(("trainer.max_steps", "callbacks.last_checkpoint.every"))],
        f"trainer.max_steps={first + counted + 1}",
        "+callbacks.host_syncs._target_=dynamixer.callbacks.HostSyncCounter",
        f"+callbacks.host_syncs.first={first}",
        f"+callbacks.host_syncs.steps={counted}",
        f"+callbacks.host_syncs.out={counts_file}",
    ]
    runs = workdir / "logs" / "dynamixer_s_imagenet" / "runs"
    last = runs / "killed" / "checkpoints" / "last.ckpt"

    began = time.monotonic()
    straight = start_train(workdir, "straight", overrides)
    killed = start_train(workdir, "killed", overrides)
    syncs = start_train(workdir, "syncs", counting)
    while saved_step(last) < save_at and killed.poll() is None and budget.left() > 0:
        time.sleep(0.05)
    landed = killed.poll() is None
    if landed:  # after its mid-run save: it stops after the current step and saves that step
        killed.send_signal(signal.SIGTERM)
    wait(killed, workdir, "killed", 128 + signal.SIGTERM if landed else 0, budget.left())
    stopped_at = saved_step(last)
    resumed = start_train(workdir, "killed", overrides)
    for proc, name in ((straight, "straight"), (resumed, "killed")):
        wait(proc, workdir, name, 0, budget.left())
    try:
        wait(syncs, workdir, "syncs", 0, budget.left())
        host_syncs = {"status": "ok", **sync_counts(json.loads(counts_file.read_text()), first, counted)}
    except Exception as err:  # recorded; the resume proof stands without it
        host_syncs = {"status": "failed", **failure(err)}
    runs_s = time.monotonic() - began

    losses, throughput = read_metrics(runs / "straight")
    results = json.loads((runs / "straight" / "results.json").read_text())
    resume = compare(runs / "straight" / "checkpoints" / "last.ckpt", last)
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    return {
        "command": f"python train.py {' '.join(overrides)}",
        "tree": {"train_images": classes * per_class, "classes": classes, "img_size": args.tree_img_size},
        "tree_s": round(tree_s, 1),
        "runs_s": round(runs_s, 1),
        "steps": steps,
        "global_step": results.get("global_step"),
        "run_status": results.get("status"),
        "losses_logged": losses,
        "losses_finite": finite,
        "throughput_logged": throughput,
        "throughput_note": "img/s per epoch of the uninterrupted run, sharing the device with the two other runs",
        "sigterm": {"landed_mid_run": landed, "stopped_at_step": stopped_at, "save_before_it": save_at},
        "resume": {
            **resume,
            "raw_weights_max_abs_diff": max_weight_diff(runs / "straight" / "checkpoints" / "last.ckpt", last),
        },
        "host_syncs": host_syncs,
        "passed": finite
        and landed
        and save_at < stopped_at < steps
        and resume["identical"]
        and results.get("global_step") == steps,
    }


# --------------------------------------------------------------------------------------- goals
def goals(sections: dict, tiny: bool, compiled_model: str) -> dict:
    """dynamixer_s training img/s x GMACs against sequencer2d_s's (at 224 only), and `compiled_model`'s compiled
    training img/s against its eager one (bf16)."""
    rows = {
        (r["model"], r["mode"], r["precision"], r["compiled"]): r
        for name in ("throughput_eager", "throughput_compiled")
        for r in sections.get(name, {}).get("rows", [])
        if r.get("status") == "ok"
    }

    def ratio(a, b, key="images_per_s"):
        return rows[a][key] / rows[b][key] if a in rows and b in rows else None

    out = {"at_224": not tiny}
    for compiled in (False, True):
        ours, theirs = ("dynamixer_s", "train", "bf16", compiled), ("sequencer2d_s", "train", "bf16", compiled)
        r = None if tiny else ratio(ours, theirs, "images_per_s_x_gmacs")
        met = None if r is None else r >= 1
        out["compiled" if compiled else "eager"] = {"s_vs_sequencer_gmacs_img_s": r, "met": met}
    r = ratio((compiled_model, "train", "bf16", True), (compiled_model, "train", "bf16", False))
    out["compiled_vs_eager_train"] = {"model": compiled_model, "ratio": r, "met": None if r is None else r >= 1.3}
    fused = sections.get("fused_mix", {})
    r = min(row["train_speedup"] for row in fused["rows"]) if fused.get("status") == "ok" else None
    out["fused_vs_pytorch_op_train"] = {"ratio": r, "met": None if r is None or tiny else r >= 2}
    return out


# ------------------------------------------------------------------------------------ markdown
def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    s, m = report["sections"], report["machine"]
    lines = [
        f"# GPU proof: {m['device_name']} (torch {m['torch']}, timm {m['timm']}){' --tiny' if report['tiny'] else ''}",
        "",
        "| section | status | s | note |",
        "|---|---|---|---|",
    ]
    for name, e in s.items():
        note = e.get("reason") or e.get("error") or ("passed" if e.get("passed") else "") or e.get("rows_by_status", "")
        if e.get("passed") is False:
            note = "NOT passed"
        lines.append(f"| {name} | {e['status']} | {fmt(e.get('seconds'))} | {str(note)[:120]} |")
    lines += [
        "",
        "| model | mode | precision | compiled | batch | img/s | img/s x GMACs | peak MB | first call s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("throughput_eager", "throughput_compiled"):
        for r in s.get(name, {}).get("rows", []):
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | "
                f"{fmt(r.get('batch'))} | {fmt(r.get('images_per_s'))} | {fmt(r.get('images_per_s_x_gmacs'), '.0f')} | "
                f"{fmt(r.get('peak_memory_mb'), '.0f')} | {fmt(r.get('first_call_s'))} | "
                f"{r['status']}{': ' + (r.get('reason') or r.get('error', ''))[:80] if r['status'] != 'ok' else ''} |"
            )
    if s.get("parity_cpu", {}).get("rows"):
        lines += ["", "| fp32 logits | device vs CPU | device vs fp64 | CPU vs fp64 |", "|---|---|---|---|"]
        for r in s["parity_cpu"]["rows"]:
            lines.append(
                f"| {r['model']} | {r['rel_err_vs_cpu_fp32']:.2e} | {r['device_rel_err_vs_fp64']:.2e} | "
                f"{r['cpu_rel_err_vs_fp64']:.2e} |"
            )
    c = s.get("parity_compile", {})
    if c.get("status") == "ok":
        lines += [
            "",
            f"compiled vs eager ({c['model']}, {c['backend']}, fp32): logits {c['logits_rel_err']:.2e}, worst gradient "
            f"{c['grads_rel_err_max']:.2e} ({c['grads_rel_err_worst_param']}), bound {c['bound']:.0e}",
        ]
    f = s.get("fused_mix", {})
    if f.get("status") == "ok":
        lines += [
            "",
            f"fused op against the PyTorch op ({json.dumps(f['op'])}), times in bf16:",
            "",
            "| token axis | rel. err to fp32: fp32, bf16 PyTorch / fused | forward ms PyTorch / fused | "
            "train ms PyTorch / fused | train peak MB PyTorch / fused | train speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for r in f["rows"]:
            lines.append(
                f"| {'H' if r['token_dim'] == 1 else 'W'} | {r['fused_fp32_rel_err_max']:.1e}, "
                f"{r['pytorch_bf16_rel_err_max']:.1e} / {r['fused_bf16_rel_err_max']:.1e} | "
                f"{r['pytorch_forward_ms']:.2f} / {r['fused_forward_ms']:.2f} | "
                f"{r['pytorch_train_ms']:.2f} / {r['fused_train_ms']:.2f} | "
                f"{fmt(r['pytorch_train_peak_mb'], '.0f')} / {fmt(r['fused_train_peak_mb'], '.0f')} | "
                f"{r['train_speedup']:.2f} |"
            )
        lines.append(f"{f['op']['model']} bf16 training with fused_mix: {f['model_train_speedup']:.2f}x the img/s")
    t = s.get("training_run", {})
    if t.get("status") == "ok":
        h = t["host_syncs"]
        lines += [
            "",
            f"training run: {t['global_step']} steps, losses finite: {t['losses_finite']}, logged img/s "
            f"{[round(v) for v in t['throughput_logged']]}; SIGTERM at step {t['sigterm']['stopped_at_step']}, "
            f"resumed: final weights, EMA, optimizer identical: {t['resume']['identical']}",
            f"host reads per step {h['host_reads_per_step']} (mean {h['host_reads_mean']:.1f}); CUDA syncs per step "
            f"{h['cuda_syncs_per_step'] if h['cuda_syncs_per_step'] is not None else h['cuda_syncs_skipped']}"
            if h["status"] == "ok"
            else f"host reads: {h['status']}: {h['error'][:200]}",
        ]
    g = report.get("goals")
    if g:
        lines += ["", f"goals (at 224: {g['at_224']}): {json.dumps({k: v for k, v in g.items() if k != 'at_224'})}"]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    write_report(report, out / "gpu_proof.json")
    (out / "gpu_proof.md").write_text(markdown(report))


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder of gpu_proof.json, gpu_proof.md and the runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: proves the script on a CPU in minutes")
    ap.add_argument("--budget-s", type=float, default=None, help="sections past it are skipped (default 450; tiny 900)")
    ap.add_argument("--compile-reserve-s", type=float, default=None, help="start a compiled row with this left (60)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; tiny: aot_eager)")
    ap.add_argument(
        "--compile-models",
        nargs="+",
        choices=[*MODELS, *TINY_COMPILED],
        default=None,
        help="compiled rows, in this order; the first is also the compile parity's model (default: dynamixer_s, "
        "sequencer2d_s, resmlp_36_224, mixer_b16_224, dynamixer_m, dynamixer_l; tiny: dynamixer_tiny)",
    )
    ap.add_argument("--batch", type=int, default=None, help="training batch of the throughput rows (256; tiny 2)")
    ap.add_argument("--infer-batch", type=int, default=None, help="inference batch (1024; tiny 4)")
    ap.add_argument("--train-steps", type=int, default=None, help="steps of the training run (300; tiny 16)")
    ap.add_argument("--train-batch", type=int, default=None, help="data.batch_size of the training run (64; tiny 4)")
    ap.add_argument("--train-images", type=int, default=None, help="training images of the tree (1600; tiny 32)")
    args = ap.parse_args(argv)
    args.out = args.out.absolute()  # the training runs work in their own folders: a relative path would move
    defaults = {  # name: (proof, --tiny)
        "budget_s": (450.0, 900.0),
        "compile_reserve_s": (60.0, 0.0),
        "compile_backend": ("inductor", "aot_eager"),
        "batch": (256, 2),
        "infer_batch": (1024, 4),
        "train_steps": (300, 16),
        "train_batch": (64, 4),
        "train_images": (1600, 32),
    }
    for key, values in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, values[args.tiny])
    args.warmup, args.iters = (1, 2) if args.tiny else (3, 10)
    args.workers, args.tree_img_size = (1, 40) if args.tiny else (8, 160)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    budget = Budget(args.budget_s)
    size = 1 if args.tiny else 0
    models = {name: sizes[size] for name, sizes in MODELS.items()}
    known = {**models, **TINY_COMPILED}
    compile_models = {name: known[name] for name in args.compile_models} if args.compile_models else None
    if compile_models is None:
        priority = ["dynamixer_s", "sequencer2d_s", "resmlp_36_224", "mixer_b16_224", "dynamixer_m", "dynamixer_l"]
        compile_models = TINY_COMPILED if args.tiny else {name: models[name] for name in priority}
    parity_model, parity_img = next(iter(compile_models.items()))
    if args.tiny:
        models.update(TINY_COMPILED)  # its eager rows, for the compiled/eager ratio

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "tiny": args.tiny,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "timm": timm.__version__,
            "platform": platform.platform(),
        },
        "sections": {},
    }
    sections = [
        ("parity_cpu", lambda: parity_cpu(device, args.tiny), 0.0),
        ("throughput_eager", lambda: throughput(models, False, args, device, budget), 0.0),
        ("training_run", lambda: training_run(args, device, args.out, budget), 60.0),
        ("parity_compile", lambda: parity_compile(device, parity_model, parity_img, args.compile_backend), 60.0),
        ("throughput_compiled", lambda: throughput(compile_models, True, args, device, budget), 0.0),
    ]
    for name, fn, need_s in sections:
        run_section(report, name, fn, budget, need_s=0.0 if args.tiny else need_s)
        write(report, args.out)
    # last: a kernel that fails to compile on a new GPU costs none of the figures above
    fused_need_s, skip = 0.0 if args.tiny else 30.0, fused_mix_skip(device)
    run_section(report, "fused_mix", lambda: fused_op(args, device), budget, need_s=fused_need_s, skip=skip)
    report["goals"] = goals(report["sections"], args.tiny, parity_model)
    checks = [e.get("passed") for e in report["sections"].values() if "passed" in e]
    report["passed"] = bool(checks) and all(checks)
    write(report, args.out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
