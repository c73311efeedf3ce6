"""Logging helpers for the GRPO recipe: step metrics, completion samples, reward plot.

The recipe logs every step's metrics through torchtune's metric logger (DiskLogger, WandB,
...) and also appends them to ``<output_dir>/metrics.jsonl``, one JSON object per step, which
is what `plot_metrics` reads: it works whatever logger the config picked and survives resumes
(a resumed run appends to the same file; the last record of a step wins).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from packrl.rollout.group import GroupRollout


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std of a list of floats ((0, 0) when empty)."""
    if not values:
        return 0.0, 0.0
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS, plus peak allocated accelerator memory on CUDA (GiB)."""
    out = {"memory/peak_rss_gb": peak_rss_gb()}
    if device.type == "cuda":
        out["memory/peak_cuda_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return out


class JsonlWriter:
    """Appends one JSON object per line to a file, flushing each line (safe to kill)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Step records from a metrics.jsonl, sorted by step; a repeated step keeps its last record
    (a run resumed from a checkpoint repeats the steps after that checkpoint)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(
    records: Iterable[dict[str, Any]],
    out_png: str | Path,
    keys: Sequence[str] = ("reward/mean", "accuracy", "eval/accuracy"),
    title: str = "GRPO",
) -> Path:
    """Plot the given metric keys over steps into a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png, dpi=120)


def save_figure(fig: Any, out_png: str | Path, dpi: int = 100) -> Path:
    """Lay out, write (parent folders made) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def rollout_metrics(groups: Sequence[GroupRollout]) -> dict[str, float]:
    """Reward, accuracy and length statistics of scored groups (all their completions):
    reward/mean and /std (population), per-function reward/<name>/mean, /std and /failures,
    accuracy (mean; NaN without an accuracy function), completion_len/mean, /min, /max (tokens)
    and truncated_frac (share cut at max_new_tokens)."""
    completions = [c for g in groups for c in g.completions]
    if not completions:
        return {}
    totals = [r for g in groups for r in g.reward]
    out = {"reward/mean": mean_std(totals)[0], "reward/std": mean_std(totals)[1]}
    for name in groups[0].rewards:
        values = [r for g in groups for r in g.rewards[name]]
        out[f"reward/{name}/mean"], out[f"reward/{name}/std"] = mean_std(values)
    for name in groups[0].reward_failures:
        out[f"reward/{name}/failures"] = float(sum(g.reward_failures[name] for g in groups))
    out["accuracy"] = mean_std([a for g in groups for a in g.accuracy])[0]
    lengths = [len(c.token_ids) for c in completions]
    out.update(
        {
            "completion_len/mean": mean_std(lengths)[0],
            "completion_len/min": float(min(lengths)),
            "completion_len/max": float(max(lengths)),
            "truncated_frac": sum(not c.finished for c in completions) / len(completions),
        }
    )
    return out
