"""benchmarks/gpu_proof.py, the one command a lent GPU runs (issue 20), runs end to end on the CPU at tiny sizes:
every section ran, its numbers are finite, the parities hold, and the SIGTERM-stopped run resumed to the
uninterrupted run's weights. Its figures are the GPU's to give; here only the machinery is proven."""

from __future__ import annotations

import json
import math

import pytest

from helpers import run_script

pytestmark = pytest.mark.slow  # about 2 minutes on a 2-core CPU: six models, three training runs, two compiles

SECTIONS = ("parity_cpu", "throughput_eager", "training_run", "parity_compile", "throughput_compiled", "fused_mix")
MODELS = {"dynamixer_s", "dynamixer_m", "dynamixer_l", "sequencer2d_s", "resmlp_36_224", "mixer_b16_224"}


def numbers(obj) -> list[float]:
    """Every int and float in a nested JSON value (booleans aside)."""
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in numbers(value)]
    if isinstance(obj, list):
        return [v for value in obj for v in numbers(value)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_gpu_proof_runs_end_to_end_on_the_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "proof"
    run_script("benchmarks/gpu_proof.py", ["--device", "cpu", "--tiny", "--out", out], cwd=tmp_path, timeout=900)
    report = json.loads((out / "gpu_proof.json").read_text())
    sections = report["sections"]
    assert report["tiny"] and report["machine"]["device"] == "cpu"
    assert {name: sections[name]["status"] for name in SECTIONS} == dict.fromkeys(SECTIONS, "ok"), {
        name: sections[name].get("error") for name in SECTIONS
    }
    assert all(math.isfinite(v) for v in numbers(report))
    checks = {name: e["passed"] for name, e in sections.items() if "passed" in e}
    assert all(checks.values()) and report["passed"] is True, (checks, sections)

    # fp32 logits on the device against the CPU's, and both against fp64
    parity = sections["parity_cpu"]
    assert [r["model"] for r in parity["rows"]] == ["dynamixer_s", "dynamixer_m", "dynamixer_l"]
    for r in parity["rows"]:
        assert r["passed"] and r["rel_err_vs_cpu_fp32"] < parity["bound"] == 1e-4, r
        assert r["device_rel_err_vs_fp64"] < 1e-5 and r["cpu_rel_err_vs_fp64"] < 1e-5, r

    # every model trains and infers in bf16; fp16 with the grad scaler is CUDA's, recorded as skipped
    rows = {(r["model"], r["mode"], r["precision"]): r for r in sections["throughput_eager"]["rows"]}
    assert {model for model, _, _ in rows} == MODELS | {"dynamixer_tiny"}
    for model in MODELS:
        for mode, batch in (("train", 2), ("infer", 4)):
            r = rows[(model, mode, "bf16")]
            assert r["status"] == "ok" and r["batch"] == batch and r["images_per_s"] > 0, r
            assert r["peak_memory_mb"] is None  # CUDA's max_memory_allocated only
    fp16 = rows[("dynamixer_s", "train", "fp16")]
    assert fp16["status"] == "skipped" and fp16["reason"].startswith("CUDA only")
    compiled = {(r["model"], r["mode"]): r for r in sections["throughput_compiled"]["rows"]}
    assert set(compiled) == {("dynamixer_tiny", "train"), ("dynamixer_tiny", "infer")}
    assert all(r["status"] == "ok" and r["compiled"] and r["images_per_s"] > 0 for r in compiled.values())
    assert sections["throughput_compiled"]["backend"] == "aot_eager"

    # compiled vs eager: logits and every gradient
    c = sections["parity_compile"]
    assert c["passed"] and c["model"] == "dynamixer_tiny" and c["grads_compared"] > 100
    assert c["logits_rel_err"] < c["bound"] and c["grads_rel_err_max"] < c["bound"]

    # the experiment's training run: finite losses, throughput logged, SIGTERM mid-run, resumed to the same state
    t = sections["training_run"]
    assert t["passed"] and t["command"].startswith("python train.py experiment=dynamixer_s_imagenet trainer.devices=1")
    assert t["global_step"] == t["steps"] == 16 and t["run_status"] == "finished"
    assert t["losses_logged"] and t["losses_finite"] and all(v > 0 for v in t["throughput_logged"])
    # the save mid-way through the second epoch (8 steps each), the stop after it, before that epoch's end
    assert t["sigterm"]["landed_mid_run"] and t["sigterm"]["save_before_it"] == 12
    assert 12 < t["sigterm"]["stopped_at_step"] < 16
    resume = t["resume"]
    assert resume["identical"] and resume["global_step"] == [16, 16] and resume["raw_weights_max_abs_diff"] == 0
    assert all(resume[part]["identical"] and resume[part]["tensors"] > 0 for part in ("raw_weights", "ema_weights"))
    # host reads counted per step in the main process; CUDA's sync debug mode is recorded as skipped
    h = t["host_syncs"]
    assert h["status"] == "ok" and len(h["host_reads_per_step"]) == 4
    assert all(isinstance(n, int) and n >= 0 for n in h["host_reads_per_step"])
    assert h["cuda_syncs_per_step"] is None and h["cuda_syncs_skipped"].startswith("CUDA only")

    # the fused op (in Triton's interpreter here: conftest.py sets TRITON_INTERPRET=1, which the script inherits)
    f = sections["fused_mix"]
    assert f["status"] == "ok" and f["passed"] and f["op"]["model"] == "dynamixer_tiny", f.get("error")
    assert [r["token_dim"] for r in f["rows"]] == [1, 2]
    for r in f["rows"]:
        assert r["passed"] and r["fused_fp32_rel_err_max"] < f["bound"] == 1e-4, r
        assert all(r[f"fused_{p}_rel_err_max"] <= 1.5 * r[f"pytorch_{p}_rel_err_max"] for p in ("bf16", "fp16")), r
        assert r["pytorch_train_ms"] > 0 and r["fused_train_ms"] > 0 and r["train_speedup"] > 0, r
    assert [r["fused_mix"] for r in f["model_rows"]] == [False, True]
    assert all(r["images_per_s"] > 0 for r in f["model_rows"])

    # the goals need the 224 figures of a GPU; the compiled/eager ratio is computed at any size
    goals = report["goals"]
    assert goals["at_224"] is False and goals["eager"]["s_vs_sequencer_gmacs_img_s"] is None
    assert goals["compiled_vs_eager_train"]["model"] == "dynamixer_tiny"
    assert goals["compiled_vs_eager_train"]["ratio"] > 0
    assert goals["fused_vs_pytorch_op_train"]["ratio"] > 0 and goals["fused_vs_pytorch_op_train"]["met"] is None

    table = (out / "gpu_proof.md").read_text()
    assert all(name in table for name in (*SECTIONS, *MODELS))
