"""Audit Temporal Clue puzzle files for answer shortcuts (and, optionally, re-check them).

    python tools/audit_puzzles.py puzzles/*.jsonl --json audit.json --markdown audit.md
    python tools/audit_puzzles.py puzzles/large_test.jsonl --recheck --minimal

For each file and question kind: how often each answer-free heuristic is right
(packrl/tasks/temporal_clue/audit.py lists them) against chance, with the standard error.
Exits 1 if some heuristic beats chance by more than --bound points on some kind (default 5),
or, with --recheck, if the independent checker (packrl/tasks/temporal_clue/recheck.py, a
second CP-SAT model built from the record alone) finds a record whose key breaks a rule or
a clue, or whose answers are not unique (--minimal: or that has a removable clue).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packrl.tasks.temporal_clue.audit import audit, markdown_table  # noqa: E402
from packrl.tasks.temporal_clue.files import read_puzzles  # noqa: E402
from packrl.tasks.temporal_clue.recheck import recheck  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("files", nargs="+", type=Path, help="puzzle JSONL files (generated records)")
    ap.add_argument("--bound", type=float, default=5.0, help="allowed excess over chance, points")
    ap.add_argument("--json", type=Path, help="write all results as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the summary table here")
    ap.add_argument("--recheck", action="store_true", help="also run the independent checker")
    ap.add_argument("--minimal", action="store_true", help="with --recheck: also test minimality")
    args = ap.parse_args(argv)

    results, rechecks, failed = {}, {}, False
    for path in args.files:
        recs = read_puzzles(path)
        results[str(path)] = audit(recs)
        for kind, r in results[str(path)].items():
            if 100 * r["worst_excess"] > args.bound:
                failed = True
                print(f"{path}: {kind}: {r['worst']} beats chance by "
                      f"{100 * r['worst_excess']:.1f} points", file=sys.stderr)  # fmt: skip
        if args.recheck:
            t0, bad = time.perf_counter(), {}
            for rec in recs:
                problems = recheck(rec, minimal=args.minimal)
                if problems:
                    bad[rec.get("id", "?")] = problems
            rechecks[str(path)] = {"records": len(recs), "failed": bad, "minimal": args.minimal,
                                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            failed |= bool(bad)
            print(f"{path}: re-check {len(recs) - len(bad)}/{len(recs)} passed "
                  f"({rechecks[str(path)]['seconds']} s)", file=sys.stderr)  # fmt: skip
    table = markdown_table(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"bound_points": args.bound, "audit": results,
                                         "recheck": rechecks}, indent=1) + "\n")  # fmt: skip
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
