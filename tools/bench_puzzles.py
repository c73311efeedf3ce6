"""Benchmark Temporal Clue generation: seconds per puzzle on one core, for each difficulty.

    python tools/bench_puzzles.py --players 1-10 --n 10 --json bench_puzzles.json
    python tools/bench_puzzles.py --n 5 --compare-defaults   # A/B against CP-SAT defaults
    python tools/bench_puzzles.py --players 8 --n 3 --compare-probing  # A/B: probing+symmetry on
    python tools/bench_puzzles.py --players 9 --n 20 --timeout 300   # give up on a puzzle past 300 CPU s

Puzzles are generated one at a time in this process (CP-SAT with one worker), so each
number is single-core. Both wall-clock and CPU seconds are reported: on a loaded machine the
CPU seconds are the steadier figure. With --compare-defaults every seed is also generated
with CP-SAT's default parameters (presolve and LP relaxation on) right after the tuned run,
interleaved, so the ratio is measured under the same load. --compare-probing does the same
with CP-SAT's probing and symmetry detection switched back on (the tuning before generator 2).
Words are whitespace-separated words of the prompt. With --timeout, a puzzle that uses more
CPU seconds than that is abandoned and counted as the timeout (so median/p95 are lower bounds
then; "timeouts" says how many).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ortools  # noqa: E402

from packrl.tasks.temporal_clue import generate as gen  # noqa: E402
from packrl.tasks.temporal_clue import model as tc_model  # noqa: E402

TUNED = tc_model.solver_params


def cpsat_defaults(solver):
    """Variant B: one worker and a fixed seed (still deterministic), otherwise defaults."""
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    return solver


def probing_on(solver):
    """Variant B: today's parameters with probing and symmetry detection left at defaults."""
    TUNED(solver)
    solver.parameters.ClearField("cp_model_probing_level")
    solver.parameters.ClearField("symmetry_level")
    return solver


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    return {"median": round(statistics.median(s), 4), "p95": round(p95, 4), "max": round(s[-1], 4)}


class Timeout(Exception):
    """A puzzle used more CPU seconds than --timeout."""


def _on_timeout(signum, frame):
    raise Timeout


def timed(seed: int, players: int, timeout: float = 0) -> tuple[float, float, dict | None]:
    """(wall s, CPU s, record), the record None past `timeout` CPU seconds (0: no limit)."""
    w0, c0 = time.perf_counter(), time.process_time()
    if timeout:  # a CPU-time alarm: counts this process's time only, like the result
        signal.signal(signal.SIGPROF, _on_timeout)
        signal.setitimer(signal.ITIMER_PROF, timeout)
    try:
        rec = gen.generate_puzzle(seed, players)
    except Timeout:
        rec = None
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    return time.perf_counter() - w0, time.process_time() - c0, rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument(
        "--players", default="1-10", help="difficulties, e.g. 1-10 or 2,4 (default 1-10)"
    )
    ap.add_argument("--n", type=int, default=10, help="puzzles per difficulty (default 10)")
    ap.add_argument("--seed", type=int, default=1000, help="first seed (default 1000)")
    ap.add_argument("--compare-defaults", action="store_true",
                    help="also time CP-SAT default parameters on the same seeds (A/B)")  # fmt: skip
    ap.add_argument("--compare-probing", action="store_true",
                    help="also time probing and symmetry detection switched on (A/B)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=0,
                    help="CPU seconds after which a puzzle is abandoned (default: none)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    lo, _, hi = args.players.partition("-")
    sizes = list(range(int(lo), int(hi or lo) + 1)) if "," not in args.players else [int(x) for x in args.players.split(",")]  # fmt: skip

    results = {}
    for p in sizes:
        rows: dict[str, list] = {"wall": [], "cpu": [], "clues": [], "questions": [], "conflicts": [], "solves": [], "prompt_chars": [], "words": [], "b_wall": [], "b_cpu": [], "timeouts": [], "worlds": []}  # fmt: skip
        for i in range(args.n):
            seed = args.seed + i
            tc_model.solver_params = TUNED
            wall, cpu, rec = timed(seed, p, args.timeout)
            rows["wall"].append(wall)
            rows["cpu"].append(cpu)
            if rec is None:
                rows["timeouts"].append(seed)
                print(f"  players={p} seed={seed}: abandoned after {cpu:.1f} s cpu", file=sys.stderr, flush=True)  # fmt: skip
                continue
            rows["clues"].append(rec["num_clues"])
            rows["questions"].append(len(rec["questions"]))
            rows["conflicts"].append(rec["difficulty"]["conflicts"])
            rows["solves"].append(rec["generation"]["solves_total"])
            rows["worlds"].append(rec["generation"]["worlds"])
            rows["prompt_chars"].append(len(rec["prompt"]))
            rows["words"].append(len(rec["prompt"].split()))
            print(f"  players={p} seed={seed}: {wall:.2f} s wall, {cpu:.2f} s cpu, "
                  f"{rec['num_clues']} clues, {rec['generation']}", file=sys.stderr, flush=True)  # fmt: skip
            if args.compare_defaults or args.compare_probing:
                tc_model.solver_params = cpsat_defaults if args.compare_defaults else probing_on
                wall, cpu, _ = timed(seed, p)
                rows["b_wall"].append(wall)
                rows["b_cpu"].append(cpu)
                tc_model.solver_params = TUNED
        if not rows["clues"]:
            results[p] = {"n": args.n, "timeouts": rows["timeouts"], "cpu_s": summary(rows["cpu"])}
            continue
        res = {
            "n": args.n,
            "timeouts": rows["timeouts"],
            "wall_s": summary(rows["wall"]),
            "cpu_s": summary(rows["cpu"]),
            "clues": {
                "mean": round(statistics.mean(rows["clues"]), 2),
                "min": min(rows["clues"]),
                "max": max(rows["clues"]),
            },  # fmt: skip
            "questions_mean": round(statistics.mean(rows["questions"]), 2),
            "search_conflicts_median": statistics.median(rows["conflicts"]),
            "solver_calls_median": statistics.median(rows["solves"]),  # all worlds drawn
            "worlds": {
                "mean": round(statistics.mean(rows["worlds"]), 2),
                "max": max(rows["worlds"]),
            },
            "prompt_chars_median": statistics.median(rows["prompt_chars"]),
            "words": {"median": statistics.median(rows["words"]), "max": max(rows["words"])},
        }
        if args.compare_defaults or args.compare_probing:
            res["variant_b" if args.compare_probing else "cpsat_defaults"] = {
                "wall_s": summary(rows["b_wall"]),
                "cpu_s": summary(rows["b_cpu"]),
            }
            res["speedup_cpu_median"] = round(statistics.median(rows["b_cpu"]) / statistics.median(rows["cpu"]), 2)  # fmt: skip
        results[p] = res
        print(f"players={p}: median {res['wall_s']['median']:.2f} s wall / {res['cpu_s']['median']:.2f} s cpu, "
              f"p95 {res['wall_s']['p95']:.2f} s, max {res['wall_s']['max']:.2f} s, "
              f"clues {res['clues']['mean']}", file=sys.stderr)  # fmt: skip

    out = {
        "benchmark": "temporal_clue_generation",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu_count": os.cpu_count(),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpsat_workers": 1,
        "ortools": ortools.__version__,
        "generator_version": gen.GENERATOR_VERSION,
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
