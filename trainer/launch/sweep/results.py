"""What a sweep found: per point the final and best value of each metric (a table, and a CSV), the best point per
metric, and figures: loss curves per point, and a final metric against one swept axis with one curve per value of
another (the form of the muP learning-rate transfer figure). Read from each point's metrics.jsonl only."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from trainer.core.jobdir import JobDir
from trainer.launch.sweep.spec import format_value
from trainer.launch.sweep.state import SweepState

METRICS = ("loss", "heldout_bits_per_byte")
"""Metrics summarized by default: the training loss (mean over a log window) and the held-out bits per byte."""


def history(job: JobDir) -> list[dict[str, Any]]:
    """Every row of metrics.jsonl, oldest first; lines cut short are skipped."""
    rows = []
    try:
        text = job.metrics.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _series(rows: Sequence[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, the last row of a step winning; non-finite values are left out."""
    found: dict[int, float] = {}
    for row in rows:
        value = row.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            found[row["step"]] = float(value)
    return sorted(found.items())


def summary(state: SweepState, states: dict[Path, str], metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """One row per point: its values, state, last step, and for each metric the final value and the best (lowest)
    value with its step."""
    rows = []
    for name, record in state.points.items():
        history_rows = history(record.job)
        row: dict[str, Any] = {"point": name, **record.values, "state": states.get(record.job.path, ""),
                               "step": max((r["step"] for r in history_rows), default=None)}
        for metric in metrics:
            series = _series(history_rows, metric)
            best = min(series, key=lambda sv: sv[1]) if series else (None, None)
            row[f"final_{metric}"] = series[-1][1] if series else None
            row[f"best_{metric}"], row[f"best_{metric}_step"] = best[1], best[0]
        rows.append(row)
    return rows


def best_points(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, tuple[str, float]]:
    """Metric -> (the point with the lowest final value, that value), for metrics some point has."""
    best = {}
    for metric in metrics:
        found = [(r[f"final_{metric}"], r["point"]) for r in rows if r.get(f"final_{metric}") is not None]
        if found:
            value, point = min(found)
            best[metric] = (point, value)
    return best


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def summary_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ["point", *(k.rsplit(".", 1)[-1] for k in keys), "state", "step"]:
        table.add_column(column, justify="left" if column in ("point", "state") else "right")
    for metric in metrics:
        table.add_column(f"final {metric}", justify="right")
        table.add_column(f"best {metric} (step)", justify="right")
    for row in rows:
        cells = [row["point"], *(format_value(row.get(k)) for k in keys), str(row["state"]),
                 "" if row["step"] is None else str(row["step"])]
        for metric in metrics:
            final, best, step = row[f"final_{metric}"], row[f"best_{metric}"], row[f"best_{metric}_step"]
            cells += ["" if final is None else f"{final:.4f}", "" if best is None else f"{best:.4f} ({step})"]
        table.add_row(*cells)
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, out: Path, data: dict[str, Any]) -> Path:
    """The PNG, and beside it the numbers it shows (`<name>.json`), to check or redraw it."""
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return out


def plot_curves(state: SweepState, metric: str, out: Path) -> Path:
    """One line per point: the metric against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    data: dict[str, Any] = {"metric": metric, "curves": {}}
    for name, record in state.points.items():
        series = _series(history(record.job), metric)
        if series:
            ax.plot([s for s, _ in series], [v for _, v in series], label=name, linewidth=1.2)
            data["curves"][name] = series
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {state.name}: {metric} per point")
    ax.grid(alpha=0.3)
    if len(state.points) <= 20:
        ax.legend(fontsize=7)
    return _save(fig, plt, out, data)


def plot_against(rows: Sequence[dict[str, Any]], x: str, hue: str | None, metric: str, out: Path,
                 title: str) -> Path:
    """The final metric of each point against swept key `x`, one curve per value of `hue`."""
    plt = _pyplot()
    groups: dict[Any, list[tuple[float, float]]] = {}
    for row in rows:
        value, xv = row.get(f"final_{metric}"), row.get(x)
        if value is None or not isinstance(xv, int | float) or isinstance(xv, bool):
            continue
        groups.setdefault(row.get(hue) if hue else None, []).append((float(xv), float(value)))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    data: dict[str, Any] = {"x": x, "hue": hue, "metric": f"final {metric}", "curves": {}}
    for key in sorted(groups, key=lambda k: (str(type(k)), k if isinstance(k, int | float) else str(k))):
        points = sorted(groups[key])
        label = f"{hue.rsplit('.', 1)[-1]} = {format_value(key)}" if hue else None
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        data["curves"][format_value(key)] = points
    xs = [p[0] for points in groups.values() for p in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if hue:
        ax.legend()
    return _save(fig, plt, out, data)
