"""Summarise a multirun: one row per job (its overrides and metrics); jobs that differ only in `seed` are
replicates of one setting (mean ± std over them); a Markdown table, a grid for two swept axes, a plot.

    python -m dynamixer.sweep logs/train/multiruns/<run_name> [--metric val/ema_acc1]

Writes `sweep.md`, `sweep.json` and `sweep.png` into the sweep folder. `train.py -m` runs it by itself
at the end of every sweep (a Hydra callback, see conf/hydra/default.yaml).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dynamixer.bounded import load_yaml, parse_yaml, read_text
from dynamixer.errors import EXIT_USER_ERROR, DataError, MissingPathError, UserError
from dynamixer.machinery.files import write_file
from dynamixer.utils.results import RESULTS_FILE
from dynamixer.utils.tracking import REPLICATE_KEY

METRICS = ("val/acc1", "val/ema_acc1", "val/acc5", "val/loss")


def _parse(value: str) -> Any:
    try:
        return parse_yaml(value)
    except yaml.YAMLError:
        return value


def _job(job_dir: Path) -> dict[str, Any]:
    """A job folder's row: its overrides (a list of `key=value` in `.hydra/overrides.yaml`) and results; a job
    whose files are not what a job writes gets the status `unreadable` and why."""
    try:
        items = load_yaml(job_dir / ".hydra" / "overrides.yaml") or []
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise DataError(f"{job_dir / '.hydra' / 'overrides.yaml'} is not a list of key=value overrides")
        overrides = {}
        for item in items:
            key, _, value = item.partition("=")
            overrides[key.lstrip("+~")] = _parse(value)
        results = json.loads(read_text(job_dir / RESULTS_FILE)) if (job_dir / RESULTS_FILE).is_file() else None
        if results is not None and not isinstance(results, dict):
            raise DataError(f"{job_dir / RESULTS_FILE} is not a map of results")
    except (DataError, OSError, ValueError) as err:
        return {"status": "unreadable", "error": str(err), "job": job_dir.name, "overrides": {}}
    return {**(results or {"status": "no results"}), "job": job_dir.name, "overrides": overrides}


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder of `sweep_dir`: `job`, `overrides` (dict), `status` and the results."""
    # rglob: an override value holding a "/" nests the job folder one level deeper
    rows = [_job(found.parent.parent) for found in sorted(Path(sweep_dir).rglob(".hydra/overrides.yaml"))]
    return sorted(rows, key=lambda r: int(re.match(r"\d*", r["job"]).group() or 0))


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    return [k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in rows}) > 1]


def settings(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """The jobs grouped by their swept values other than `seed` (replicates of one setting): per setting its
    values, `n` finished jobs, their seeds, and for each metric the per-seed values, mean and standard
    deviation (sample std, n-1; 0 for one job)."""
    axes = [k for k in keys if k != REPLICATE_KEY]
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        values = {k: r["overrides"].get(k) for k in axes}
        group = groups.setdefault(json.dumps(values), {"values": values, "jobs": []})
        group["jobs"].append(r)
    out = []
    for group in groups.values():
        done = [r for r in group["jobs"] if r.get("status") == "finished"]
        metrics = {}
        for m in METRICS:
            values = [v for v in (_metric(r, m) for r in done) if v is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                metrics[m] = {"mean": statistics.fmean(values), "std": std, "values": values}
        out.append(
            {
                "values": group["values"],
                "n": len(done),
                "jobs": len(group["jobs"]),
                "seeds": [r["overrides"].get(REPLICATE_KEY) for r in done],
                "metrics": metrics,
                "num_params": next((r.get("num_params") for r in done), None),
                "gmacs": next((r.get("gmacs") for r in done), None),
                "wall_s": _mean([r.get("wall_s") for r in done]),
            }
        )
    return out


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _metric(row: dict[str, Any], name: str) -> float | None:
    best = row.get("best")
    value = best.get(name) if isinstance(best, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _cell(value: Any) -> str:
    """Text for one Markdown table cell (or list item): on one line, with nothing that ends the cell or
    starts markup (a job's error text is whatever the job raised)."""
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else ""


def _mean_std(setting: dict[str, Any], metric: str) -> str:
    m = setting["metrics"].get(metric)
    return "" if m is None else f"{m['mean']:.4f} ± {m['std']:.4f}"


def settings_markdown(groups: list[dict[str, Any]], metric: str) -> str:
    """One row per setting: its values, n, mean ± std of every metric, size; with two swept axes, also the
    main metric as a grid (first axis down, second across)."""
    axes = list(groups[0]["values"]) if groups else []
    metrics = [metric] + [m for m in METRICS if m != metric]
    header = [*axes, "n", *[f"best {m} (mean ± std)" for m in metrics], "params", "GMACs", "wall s (mean)"]
    lines = [_row(header), "|" + "---|" * len(header)]
    for g in groups:
        cells = [json.dumps(g["values"][k]) for k in axes] + [str(g["n"])]
        cells += [_mean_std(g, m) for m in metrics]
        cells += [_count(g.get("num_params")), str(g.get("gmacs") or "")]
        cells.append(_seconds(g.get("wall_s")))
        lines.append(_row(cells))
    if len(axes) == 2:
        down, across = (sorted({json.dumps(g["values"][a]) for g in groups}, key=_sort_key) for a in axes)
        cell = {(json.dumps(g["values"][axes[0]]), json.dumps(g["values"][axes[1]])): g for g in groups}
        lines += ["", f"best {metric}, mean ± std: {axes[0]} (rows) x {axes[1]} (columns)", ""]
        lines += [_row([f"{axes[0]} / {axes[1]}", *across]), "|" + "---|" * (len(across) + 1)]
        for d in down:
            lines.append(_row([d, *[_mean_std(cell[(d, a)], metric) if (d, a) in cell else "" for a in across]]))
    return "\n".join(lines) + "\n"


def _sort_key(text: str) -> tuple:
    value = json.loads(text)
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, text)


def to_markdown(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    metrics = [metric] + [m for m in METRICS if m != metric]
    header = ["job", *keys, "status", *[f"best {m}" for m in metrics], "params", "GMACs", "wall s"]
    lines = [_row(header), "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["job"], *[json.dumps(r["overrides"].get(k)) for k in keys], r.get("status", "?")]
        for m in metrics:
            v = _metric(r, m)
            cells.append("" if v is None else f"{v:.4f}")
        cells += [_count(r.get("num_params")), str(r.get("gmacs") or "")]
        cells.append(_seconds(r.get("wall_s")))
        lines.append(_row(cells))
    failed = [r for r in rows if r.get("status") == "failed"]
    lines += [""] + [f"- {_cell(r['job'])} failed: {_cell(r.get('error', ''))}" for r in failed]
    return "\n".join(lines).rstrip() + "\n"


def plot(groups: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """The settings' mean `metric` against the first swept axis, with error bars of one standard deviation
    over the seeds (one line per value of the other axes); with two axes, also a heat map of the grid."""
    # a bare Figure, not pyplot: no GUI backend needed, and a notebook's backend stays as it is
    from matplotlib.figure import Figure

    axes = list(groups[0]["values"]) if groups else []
    x_key = axes[0] if axes else "setting"
    series: dict[str, list[tuple[Any, float, float]]] = {}
    for i, g in enumerate(groups):
        m = g["metrics"].get(metric)
        if m is None:
            continue
        x = g["values"][x_key] if axes else i
        label = ", ".join(f"{k}={g['values'][k]}" for k in axes[1:]) or metric
        series.setdefault(label, []).append((x, m["mean"], m["std"]))
    fig = Figure(figsize=(11 if len(axes) == 2 else 6, 4))
    ax, *grid_ax = fig.subplots(1, 2 if len(axes) == 2 else 1, squeeze=False)[0]
    numeric = all(isinstance(x, (int, float)) for s in series.values() for x, _, _ in s)
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0]) if numeric else points
        xs = [p[0] if numeric else str(p[0]) for p in points]
        ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=label)
    if numeric and all(x > 0 for s in series.values() for x, _, _ in s):
        ax.set_xscale("log", base=2)
        ticks = sorted({x for s in series.values() for x, _, _ in s})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"best {metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    if grid_ax:
        down, across = (sorted({json.dumps(g["values"][a]) for g in groups}, key=_sort_key) for a in axes)
        means = {
            (json.dumps(g["values"][axes[0]]), json.dumps(g["values"][axes[1]])): g["metrics"].get(metric)
            for g in groups
        }
        grid = [[(means.get((d, a)) or {}).get("mean", float("nan")) for a in across] for d in down]
        image = grid_ax[0].imshow(grid, cmap="viridis", aspect="auto")
        grid_ax[0].set_xticks(range(len(across)), across)
        grid_ax[0].set_yticks(range(len(down)), down)
        grid_ax[0].set_xlabel(axes[1])
        grid_ax[0].set_ylabel(axes[0])
        fig.colorbar(image, ax=grid_ax[0], label=f"best {metric} (mean)")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    return write_file(path, image.getvalue())


def summarize(sweep_dir: str | Path, metric: str | None = None) -> dict[str, Path]:
    """Write `sweep.md`, `sweep.json` and `sweep.png` for the sweep in `sweep_dir`; return their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise MissingPathError(f"{sweep_dir} holds no job folders (*/.hydra/overrides.yaml): is it a multirun folder?")
    metric = metric or next((r["monitor"] for r in rows if r.get("monitor")), "val/acc1")
    keys = swept_keys(rows)
    out = {"table": sweep_dir / "sweep.md", "json": sweep_dir / "sweep.json", "plot": sweep_dir / "sweep.png"}
    groups = settings(rows, keys)
    table = to_markdown(rows, keys, metric)
    if REPLICATE_KEY in keys or len(groups[0]["values"]) == 2:  # the settings (mean ± std, grid), then every job
        table = settings_markdown(groups, metric) + "\n" + table
    write_file(out["table"], table)
    report = {"metric": metric, "swept": keys, "settings": groups, "jobs": rows}
    write_file(out["json"], json.dumps(report, indent=2, default=str) + "\n")
    plot(groups, metric, out["plot"])
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
    try:
        paths = summarize(args.sweep_dir, args.metric)
    except UserError as err:  # one message, as the entry points give it
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    print(paths["table"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
