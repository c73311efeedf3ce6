"""Benchmark the sandbox and the rewards that use it; prints JSON (and writes it with --json).

Measures, in one run:
1. sandbox start-up: ``run_python("pass")`` with every isolation layer vs. without namespaces,
   seccomp and cgroup (interleaved, medians), i.e. what the isolation costs per run;
2. HumanEval: all 164 canonical solutions (must all pass) and ``return None`` stubs (must
   all fail), all-or-nothing, with N sandbox runs in parallel: wall time and throughput;
3. the math reward: ``RewardScorer([math_accuracy])`` on 32 completions (one recipe step),
   median latency per call.

    python tools/bench_sandbox.py --json /tmp/bench_sandbox.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packrl.execution.sandbox import isolation, run_python  # noqa: E402
from packrl.rewards import RewardScorer  # noqa: E402
from packrl.tasks.code import extract_code, humaneval_rows, run_tests  # noqa: E402
from packrl.tasks.math import math_accuracy  # noqa: E402


def bench_startup(repeats: int) -> dict:
    full = isolation()
    bare = dataclasses.replace(full, namespaces=False, seccomp=False, cgroup=False)
    times: dict[str, list[float]] = {"all_layers": [], "no_namespaces_seccomp_cgroup": []}
    for _ in tqdm(range(repeats), desc="sandbox start-up"):
        for name, layers in (("all_layers", full), ("no_namespaces_seccomp_cgroup", bare)):
            start = time.perf_counter()
            res = run_python("pass", layers=layers)
            times[name].append(time.perf_counter() - start)
            assert res.ok, res
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": med,
        "ratio_all_layers_vs_bare": med["all_layers"] / med["no_namespaces_seccomp_cgroup"],
        "repeats": repeats,
    }


def bench_humaneval(workers: int) -> dict:
    rows = humaneval_rows()
    n_tests = sum(len(r["tests"]) for r in rows)
    out = {"workers": workers, "problems": len(rows), "tests": n_tests}
    for name, body in (
        ("canonical", lambda r: r["canonical_solution"]),
        (
            "return_none_stub",
            lambda r: f"def {r['entry_point']}(*args, **kwargs):\n    return None\n",
        ),
    ):
        completions = [f"```python\n{body(r)}\n```" for r in rows]

        def score(i: int, completions: list[str] = completions) -> bool:
            code = extract_code(completions[i], rows[i]["entry_point"])
            row = rows[i]
            return all(
                run_tests(code, row["tests"], row["preamble"], entry_point=row["entry_point"])
            )

        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            passed = list(
                tqdm(pool.map(score, range(len(rows))), total=len(rows), desc=f"{name} x{workers}")
            )
        wall = time.perf_counter() - start
        out[name] = {
            "passed": sum(passed),
            "wall_s": round(wall, 2),
            "problems_per_s": round(len(rows) / wall, 2),
            "tests_per_s": round(n_tests / wall, 1),
        }
    return out


def bench_math(repeats: int) -> dict:
    scorer = RewardScorer([math_accuracy])
    completions = [f"So the answer is \\boxed{{{i + 10}}}." for i in range(32)]
    answers = [str(i + 10 + (i % 4 == 0)) for i in range(32)]
    prompts = [[{"role": "user", "content": "q"}]] * 32
    scorer(prompts, completions, {"answer": answers})  # start the workers
    times = []
    for _ in tqdm(range(repeats), desc="math reward"):
        start = time.perf_counter()
        scores = scorer(prompts, completions, {"answer": answers})
        times.append(time.perf_counter() - start)
    assert scores.total.sum().item() == 24
    return {
        "completions_per_call": 32,
        "median_call_s": statistics.median(times),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="parallel sandbox runs")
    parser.add_argument("--startup-repeats", type=int, default=20)
    parser.add_argument("--math-repeats", type=int, default=20)
    args = parser.parse_args()

    result = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "isolation": isolation().describe(),
        "startup": bench_startup(args.startup_repeats),
        "humaneval": [bench_humaneval(w) for w in args.workers],
        "math_reward": bench_math(args.math_repeats),
    }
    result["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
