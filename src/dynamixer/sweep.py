"""Summarise a multirun: one row per job (its overrides and metrics), a Markdown table and a plot.

    python -m dynamixer.sweep logs/train/multiruns/<run_name> [--metric val/ema_acc1]

Writes `sweep.md`, `sweep.json` and `sweep.png` into the sweep folder. `train.py -m` runs it by itself
at the end of every sweep (a Hydra callback, see conf/hydra/default.yaml).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dynamixer.utils.results import RESULTS_FILE, read_results

METRICS = ("val/acc1", "val/ema_acc1", "val/acc5", "val/loss")


def _parse(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder of `sweep_dir`: `job`, `overrides` (dict), `status` and the results."""
    rows = []
    # rglob: an override value holding a "/" nests the job folder one level deeper
    for overrides_file in sorted(Path(sweep_dir).rglob(".hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = {}
        for item in yaml.safe_load(overrides_file.read_text()) or []:
            key, _, value = item.partition("=")
            overrides[key.lstrip("+~")] = _parse(value)
        results = read_results(job_dir) if (job_dir / RESULTS_FILE).is_file() else {"status": "no results"}
        rows.append({**results, "job": job_dir.name, "overrides": overrides})
    return sorted(rows, key=lambda r: int(r["job"].split("_", 1)[0]) if r["job"][0].isdigit() else 0)


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    return [k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in rows}) > 1]


def _metric(row: dict[str, Any], name: str) -> float | None:
    best = row.get("best") or {}
    value = best.get(name)
    return None if value is None else float(value)


def to_markdown(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    metrics = [metric] + [m for m in METRICS if m != metric]
    header = ["job", *keys, "status", *[f"best {m}" for m in metrics], "params", "GMACs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["job"], *[json.dumps(r["overrides"].get(k)) for k in keys], r.get("status", "?")]
        for m in metrics:
            v = _metric(r, m)
            cells.append("" if v is None else f"{v:.4f}")
        cells += [f"{r['num_params']:,}" if r.get("num_params") else "", str(r.get("gmacs") or "")]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.get("status") == "failed"]
    lines += [""] + [f"- {r['job']} failed: {r.get('error', '')}" for r in failed]
    return "\n".join(lines).rstrip() + "\n"


def plot(rows: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> Path:
    """`metric` against the swept value (one line per combination of the other swept keys)."""
    # a bare Figure, not pyplot: no GUI backend needed, and a notebook's backend stays as it is
    from matplotlib.figure import Figure

    x_key = keys[0] if keys else "job"
    series: dict[str, list[tuple[Any, float]]] = {}
    for r in rows:
        y = _metric(r, metric)
        if y is None:
            continue
        x = r["overrides"].get(x_key, r["job"])
        label = ", ".join(f"{k}={r['overrides'].get(k)}" for k in keys[1:]) or metric
        series.setdefault(label, []).append((x, y))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    numeric = all(isinstance(x, (int, float)) for s in series.values() for x, _ in s)
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0]) if numeric else points
        xs = [p[0] if numeric else str(p[0]) for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", label=label)
    if numeric and all(x > 0 for s in series.values() for x, _ in s):
        ax.set_xscale("log", base=2)
        ticks = sorted({x for s in series.values() for x, _ in s})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"best {metric}")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def summarize(sweep_dir: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Write `sweep.md`, `sweep.json` and `sweep.png` for the sweep in `sweep_dir`; return their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (*/.hydra/overrides.yaml): is it a multirun folder?")
    metric = metric or next((r["monitor"] for r in rows if r.get("monitor")), "val/acc1")
    keys = swept_keys(rows)
    out = {"table": sweep_dir / "sweep.md", "json": sweep_dir / "sweep.json", "plot": sweep_dir / "sweep.png"}
    out["table"].write_text(to_markdown(rows, keys, metric))
    out["json"].write_text(json.dumps({"metric": metric, "swept": keys, "jobs": rows}, indent=2, default=str) + "\n")
    plot(rows, keys, metric, out["plot"])
    return out


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = summarize(config.hydra.sweep.dir)
        print(paths["table"].read_text())
        print(f"sweep summary: {paths['table']} and {paths['plot']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. logs/train/multiruns/<run_name>")
    parser.add_argument("--metric", default=None, help="metric to plot (default: the runs' monitored metric)")
    args = parser.parse_args(argv)
    paths = summarize(args.sweep_dir, args.metric)
    print(paths["table"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
