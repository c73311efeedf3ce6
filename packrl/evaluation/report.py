"""An evaluation's report: a markdown table (one row per model), breakdowns, and a plot of
accuracy by difficulty (one line per model)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from packrl.evaluation.metrics import sort_key
from packrl.training.metrics import save_figure


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(results: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """Markdown of ``{model name: eval_metrics(...)}``: the headline table (one row per
    model), accuracy by difficulty (one row per model, one column per level) and, when
    any model has per-question grades, accuracy by question kind."""
    models = list(results)
    ks = sorted(
        {int(k[5:]) for m in results.values() for k in m if k.startswith("pass@")},
    )
    header = ["model", "prompts", "samples", "accuracy", "mean reward"]
    header += [f"pass@{k}" for k in ks] + ["mean length", "truncated"]
    rows = []
    for name in models:
        m = results[name]
        rows.append(
            [
                name,
                _fmt(int(m.get("prompts", 0))),
                _fmt(int(m.get("samples_per_prompt", 0))),
                _fmt(m.get("accuracy")),
                _fmt(m.get("reward/mean")),
                *[_fmt(m.get(f"pass@{k}")) for k in ks],
                _fmt(m.get("completion_len/mean"), 1),
                _fmt(m.get("truncated_frac")),
            ]
        )
    parts = [f"## {title}\n" if title else "", _table(header, rows)]

    columns = {m["by_difficulty"]["column"] for m in results.values() if m.get("by_difficulty")}
    columns.discard(None)
    if columns:
        levels = sorted(
            {lv for m in results.values() for lv in m["by_difficulty"]["levels"]}, key=sort_key
        )
        column = "/".join(sorted(columns))
        rows = [
            [name]
            + [
                _fmt(results[name]["by_difficulty"]["levels"].get(lv, {}).get("accuracy"))
                for lv in levels
            ]
            for name in models
        ]
        parts += [f"\nAccuracy by {column}:\n", _table(["model", *levels], rows)]

    kinds = sorted({k for m in results.values() for k in m.get("by_question", {})})
    if kinds:
        rows = [
            [name]
            + [_fmt(results[name].get("by_question", {}).get(k, {}).get("accuracy")) for k in kinds]
            for name in models
        ]
        parts += ["\nAccuracy by question (Temporal Clue):\n", _table(["model", *kinds], rows)]
    return "\n".join(p for p in parts if p) + "\n"


def plot_accuracy_by_difficulty(
    results: Mapping[str, Mapping[str, Any]], out_png: str | Path, title: str = ""
) -> Path:
    """PNG of accuracy (y, 0-1) against difficulty level (x), one line per model; a task
    without levels is one point per model at "all"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    column = None
    for name, m in results.items():
        levels = (m.get("by_difficulty") or {}).get("levels") or {}
        column = column or (m.get("by_difficulty") or {}).get("column")
        if levels:
            xs = sorted(levels, key=sort_key)
            ys = [levels[x]["accuracy"] for x in xs]
        else:
            xs, ys = ["all"], [m.get("accuracy", float("nan"))]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(column or "difficulty")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "accuracy by difficulty")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png, dpi=100)
