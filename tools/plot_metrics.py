"""Plot a GRPO run's metrics (reward, accuracy, ...) over steps into a PNG.

    python tools/plot_metrics.py outputs/smollm2_135m_arithmetic_full_cpu
    python tools/plot_metrics.py run/metrics.jsonl --keys reward/mean eval/accuracy --out r.png

The recipe writes `<output_dir>/metrics.jsonl` (one JSON object per step) whatever metric
logger the config uses, and plots it to `<output_dir>/reward.png` at the end of a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from packrl.training.metrics import plot_metrics, read_metrics


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run's output_dir or its metrics.jsonl")
    parser.add_argument(
        "--keys",
        nargs="+",
        default=["reward/mean", "accuracy", "eval/accuracy"],
        help="metric names to plot (default: reward/mean accuracy eval/accuracy)",
    )
    parser.add_argument("--out", help="PNG path (default: reward.png next to metrics.jsonl)")
    parser.add_argument("--title", default="GRPO")
    args = parser.parse_args(argv)
    path = Path(args.path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        parser.error(f"{metrics} does not exist; pass a run's output_dir or its metrics.jsonl")
    out = Path(args.out) if args.out else metrics.parent / "reward.png"
    png = plot_metrics(read_metrics(metrics), out, keys=args.keys, title=args.title)
    print(png)
    return png


if __name__ == "__main__":
    main()
