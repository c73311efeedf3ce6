"""Step-time split of the GRPO recipe on 1 rank against N ranks (torchrun, FSDP2), in one run.

    python tools/bench_distributed.py --json bench_distributed.json                  # CPU demo
    python tools/bench_distributed.py --nproc 1 8 --steps 5 --json qwen.json \\
        --config tune_configs/qwen2_5_1_5b_temporal_clue_full.yaml                     # a GPU node

For each process count, runs `tune run [--nproc_per_node N] recipes/grpo.py` on the config
for `--steps` steps (no evaluation, no checkpoints) and reports the per-step medians of rank
0's time split (generation, scoring, reference forward, policy forward/backward, whole step),
rollout and training tokens/s, and, from the first step, the values that must agree across
process counts (reward, loss, grad norm), which show both runs trained on the same batch.
The first step is left out of the medians (warm-up). Prints JSON and writes it to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLIT = [
    "time/generation_s",
    "time/scoring_s",
    "time/reference_s",
    "time/policy_s",
    "time/training_s",
    "time/step_s",
    "tokens_per_s/generation",
    "tokens_per_s/training",
]
SAME = ["reward/mean", "loss/tokens", "loss/policy_loss", "grad_norm", "rollout/logprob_drift"]


def run(config: str, nproc: int, steps: int, out: Path, overrides: list[str], threads: int):
    launch = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [
        str(Path(sys.executable).parent / "tune"),
        "run",
        *launch,
        "recipes/grpo.py",
        "--config",
        config,
        f"output_dir={out}",
        f"max_steps={steps}",
        "save_every_n_steps=null",
        "eval.at_start=false",
        "eval.every_n_steps=null",
        "plot=false",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    steps_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = steps_logged[1:] or steps_logged
    return {
        "nproc": nproc,
        "threads_per_rank": threads,
        "wall_s": round(wall, 1),
        "median": {k: statistics.median(s[k] for s in timed) for k in SPLIT if k in timed[0]},
        "first_step": {k: steps_logged[0].get(k) for k in SAME},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tune_configs/smollm2_135m_arithmetic_full_cpu.yaml")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP threads per rank (default: cores // nproc, at least 1)",
    )
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    results = []
    for nproc in args.nproc:
        threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
        with tempfile.TemporaryDirectory(prefix="packrl-bench-dist-") as tmp:
            results.append(run(args.config, nproc, args.steps, Path(tmp), args.overrides, threads))
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": args.steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "runs": results,
    }
    text = json.dumps(report, indent=2)
    Path(args.json).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
