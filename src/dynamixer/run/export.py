"""Weights out: a training checkpoint as the folder timm and the Hugging Face Hub use."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from timm.models import save_for_hf

from dynamixer.errors import ConfigError
from dynamixer.run.checkpoints import load_model
from dynamixer.utils.complexity import count_gmacs, count_params

log = logging.getLogger(__name__)

# the model arguments that define the architecture beyond the variant's name (training-only ones stay out)
ARCHITECTURE_ARGS = ("img_size", "segments", "reduced_dim", "fusion", "mixing")


def export(cfg: DictConfig) -> Path:
    """Write `cfg.out_dir/model.safetensors` and `config.json` (architecture, class count and names, model
    arguments, the data config: input size, mean, std, crop_pct, interpolation) with timm's own writer, and
    the model card `README.md` (`model_card`);
    `timm.create_model("local-dir:<out_dir>", pretrained=True)` rebuilds the model from them. With `cfg.onnx`,
    also `model.onnx`, checked against PyTorch with onnxruntime. `out_dir` is new: an export never replaces
    another (nor writes through a link): it is written into a fresh folder beside it and renamed into place."""
    out_dir = Path(cfg.out_dir).expanduser().absolute()
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise ConfigError(
            f"out_dir={out_dir} exists and is not an empty folder: an export never replaces another. Give a new "
            "out_dir, or remove that one first"
        )
    model, stored = load_model(cfg.ckpt_path, cfg.weights)
    model_args: dict[str, Any] = {k: stored.model[k] for k in ARCHITECTURE_ARGS if stored.model.get(k) is not None}
    model_args["num_classes"] = stored.num_classes
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))  # new, ours alone
    fresh.chmod(out_dir.parent.stat().st_mode & 0o777)  # as readable as the folder it goes into
    try:
        _write(model, stored, model_args, fresh, cfg.onnx, out_dir.name)
        os.rename(fresh, out_dir)  # onto an empty folder or none; fails if one appeared meanwhile
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    written = [out_dir / name for name in ("model.safetensors", "config.json", "README.md")]
    written += [out_dir / "model.onnx"] if cfg.onnx else []
    log.info("exported the %s weights of %s to %s", cfg.weights, cfg.ckpt_path, out_dir)
    print("written: " + ", ".join(map(str, written)))
    return out_dir


def _write(
    model: torch.nn.Module, stored: Any, model_args: dict[str, Any], out_dir: Path, onnx: bool, name: str
) -> None:
    info = stored.data_info
    save_for_hf(
        model,
        str(out_dir),
        model_config={"label_names": list(info["class_names"])},
        model_args=model_args,
        safe_serialization=True,
        data_config={
            "input_size": (3, info["img_size"], info["img_size"]),
            "crop_pct": info["crop_pct"],
            "interpolation": info["interpolation"],
            "mean": tuple(info["mean"]),
            "std": tuple(info["std"]),
        },
    )
    (out_dir / "README.md").write_text(model_card(model, stored, model_args, name))
    if onnx:
        difference = export_onnx(model, out_dir / "model.onnx")
        log.info("model.onnx checked with onnxruntime: max abs difference %.2e from PyTorch", difference)


_VERSION = re.compile(r"[0-9][0-9A-Za-z.+_-]{0,40}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CITATION = """@inproceedings{wang2022dynamixer,
  title     = {DynaMixer: A Vision MLP Architecture with Dynamic Mixing},
  author    = {Wang, Ziyu and Jiang, Wenhao and Zhu, Yiming and Yuan, Li and Song, Yibing and Liu, Wei},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning},
  series    = {PMLR},
  volume    = {162},
  pages     = {22691--22701},
  year      = {2022}
}"""


def model_card(model: torch.nn.Module, stored: Any, model_args: dict[str, Any], name: str) -> str:
    """The export's `README.md`, as timm's exports on the Hub have one: the model (parameters, GMACs, image
    size), the data and the run's own measured results and provenance (from the checkpoint), usage with
    `timm.create_model`, the paper. Values from the checkpoint are written as JSON in code spans or dropped
    where they are not the plain values they should be (a version, a commit)."""
    info, config = stored.data_info, stored.run_config
    size = int(info["img_size"])
    shown = lambda value: f"`{json.dumps(value)[:200]}`"  # noqa: E731
    data = str(config.get("data", {}).get("_target_", "")).rsplit(".", 1)[-1] or "unknown"
    optimizer = config.get("optimizer", {})
    rows = [
        ("architecture", shown(type(model).__name__) + " " + shown(model.default_cfg.get("architecture"))),
        ("parameters", f"{count_params(model):,}"),
        ("GMACs", f"{count_gmacs(model, (3, size, size)):.3f} at {size}x{size}"),
        ("model arguments", shown(model_args)),
        ("data", f"{shown(data)}, {stored.num_classes} classes"),
        (
            "trained",
            f"{stored.global_step} optimizer steps, to epoch {stored.epoch} (from 0)"
            if stored.epoch is not None
            else "",
        ),
        ("optimizer", shown({k: optimizer.get(k) for k in ("_target_", "lr", "weight_decay") if k in optimizer})),
        ("batch size per device", shown(config.get("data", {}).get("batch_size"))),
    ]
    metrics = [m for m in stored.metrics if isinstance(m, dict)]
    keys = sorted({k for m in metrics for k in m} - {"epoch", "step"})
    results = [f"| epoch | step | {' | '.join(keys)} |", "|---" * (len(keys) + 2) + "|"]
    results += [
        f"| {m.get('epoch')} | {m.get('step')} | " + " | ".join(f"{m[k]:.4f}" if k in m else "" for k in keys) + " |"
        for m in metrics[-10:]
    ]
    versions = stored.provenance.get("versions") if isinstance(stored.provenance.get("versions"), dict) else {}
    versions = {k: v for k, v in versions.items() if isinstance(v, str) and _VERSION.fullmatch(v)}
    git = stored.provenance.get("git") if isinstance(stored.provenance.get("git"), dict) else {}
    commit = git.get("commit") if isinstance(git.get("commit"), str) and _COMMIT.fullmatch(git["commit"]) else None
    return "\n".join(
        [
            "---",
            "library_name: timm",
            "tags: [image-classification, timm, dynamixer]",
            "---",
            f"# {shown(name)}: DynaMixer",
            "",
            "A DynaMixer image classifier (Wang et al., ICML 2022, arXiv 2201.12083), trained and exported with the",
            "dynamixer framework. Its figures below come from the run's own records in its checkpoint.",
            "",
            "| | |",
            "|---|---|",
            *(f"| {key} | {value} |" for key, value in rows if value),
            "",
            "## Results measured by the run",
            "",
            "Its validation metrics at the end of its last epochs (at most ten; its checkpoint holds all):",
            "",
            *(results if metrics else ["No validation was recorded."]),
            "",
            "## Usage",
            "",
            "```python",
            "import timm",
            "import dynamixer  # registers the DynaMixer models with timm",
            "",
            f'model = timm.create_model("local-dir:{name}", pretrained=True).eval()  # or "hf-hub:<user>/<repo>"',
            "data_config = timm.data.resolve_data_config(model=model)",
            "transform = timm.data.create_transform(**data_config)",
            "```",
            "",
            "Class names: `config.json`'s `label_names`. Mean, std, crop and interpolation: its `pretrained_cfg`.",
            "",
            "## Provenance",
            "",
            f"- code commit: {shown(commit) if commit else 'unknown (not run from a git checkout)'}",
            f"- packages: {shown(versions) if versions else 'unknown'}",
            "",
            "## Citation",
            "",
            "```bibtex",
            _CITATION,
            "```",
            "",
        ]
    )


def export_onnx(model: torch.nn.Module, path: Path, tolerance: float = 1e-4) -> float:
    """`model` as ONNX (torch's dynamo exporter; input `images` `(B, 3, H, W)` with any batch size, output
    `logits`), checked with onnxruntime on a random batch: returns the max abs difference from PyTorch."""
    import onnxruntime

    example = torch.randn(2, 3, *model.img_size)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    images = torch.randn(3, 3, *model.img_size)
    with torch.no_grad():
        expected = model(images).numpy()
    got = onnxruntime.InferenceSession(str(path)).run(None, {"images": images.numpy()})[0]
    difference = float(abs(got - expected).max())
    if difference > tolerance:
        raise RuntimeError(f"{path}: onnxruntime's logits differ from PyTorch's by {difference:.2e} (> {tolerance})")
    return difference
