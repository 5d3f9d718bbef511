"""Does bf16-mixed training follow fp32? The training loss of the same run in both precisions.

Composes `conf/train.yaml` with the given overrides (the embedded digits data by default: real
images), trains `--steps` optimizer steps once with `trainer.precision=32-true` and once with
`bf16-mixed`, from the same seed, so both see the same initial weights and the same batches, and
reports every step's loss, the relative gap `|bf16 - fp32| / fp32`, the step time of each, and the
dtype the model's logits had (bf16 proves autocast ran).

    python benchmarks/bench_precision.py model=dynamixer_s data.batch_size=8 --steps 20 \
        --json benchmarks/results/precision_s.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dynamixer.run import build
from reporting import write_report

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class StepRecorder(L.Callback):
    """Each training step's loss, wall time and logits dtype."""

    def __init__(self):
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.logits_dtype: str | None = None

    def on_train_start(self, trainer, pl_module):
        pl_module.model.register_forward_hook(lambda m, i, out: setattr(self, "logits_dtype", str(out.dtype)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._t0)
        self.losses.append(outputs["loss"].item())


def train_losses(overrides: list[str], precision: str, steps: int, output_dir: Path) -> StepRecorder:
    """Train `steps` steps of the run `overrides` describe in `precision`; the recorder of its steps."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *overrides,
                f"trainer.precision={precision}",
                "trainer.max_epochs=1",
                f"trainer.max_steps={steps}",
                "trainer.limit_val_batches=0",
                "hardware=cpu" if not torch.cuda.is_available() else "hardware=gpu",
                f"paths.output_dir={output_dir}",
            ],
        )
    L.seed_everything(cfg.seed, verbose=False)
    datamodule, module = build(cfg)
    recorder = StepRecorder()
    trainer = instantiate(
        cfg.trainer,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    if len(recorder.losses) != steps:
        raise SystemExit(f"only {len(recorder.losses)} steps ran: the training split has fewer batches than --steps")
    return recorder


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, e.g. model=dynamixer_s")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/precision_run"))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    runs = {
        p: train_losses(args.overrides, p, args.steps, args.output_dir.resolve()) for p in ("32-true", "bf16-mixed")
    }
    fp32, bf16 = runs["32-true"].losses, runs["bf16-mixed"].losses
    gaps = [abs(b - f) / abs(f) for f, b in zip(fp32, bf16)]
    report = {
        "overrides": args.overrides,
        "steps": args.steps,
        "loss_fp32": fp32,
        "loss_bf16": bf16,
        "relative_gap": gaps,
        "max_relative_gap": max(gaps),
        "mean_loss_relative_gap": abs(statistics.mean(bf16) - statistics.mean(fp32)) / statistics.mean(fp32),
        "logits_dtype": {p: r.logits_dtype for p, r in runs.items()},
        # the first steps include one-off warm-up work
        "median_step_s": {p: statistics.median(r.seconds[2:] or r.seconds) for p, r in runs.items()},
    }
    print(f"{'step':>4} {'fp32':>9} {'bf16':>9} {'gap':>7}")
    for i, (f, b, g) in enumerate(zip(fp32, bf16, gaps)):
        print(f"{i:4d} {f:9.5f} {b:9.5f} {g:7.2%}")
    print(
        f"max gap {report['max_relative_gap']:.2%}; gap of the mean loss {report['mean_loss_relative_gap']:.2%}; "
        f"logits {report['logits_dtype']}; median step s {report['median_step_s']}"
    )
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
