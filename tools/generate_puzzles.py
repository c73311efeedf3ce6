"""Generate Temporal Clue puzzles as JSONL.

    python tools/generate_puzzles.py --n 64 --seed 1 --players 1-6 --workers 2 --out puzzles/x.jsonl
    python tools/generate_puzzles.py --n 8 --players 9 --suspects 11 --map irregular --rooms 14 \
        --clue-weights either=2,iff=2,direction=1,murder_time=1 --bonus 3 --given time \
        --shortcut-bound off --out x.jsonl

Candidate i gets difficulty players[i % len(players)] and seed ``seed * 1_000_000 + i``, so a
file is reproducible from its command, and files made with different --seed never share a
puzzle seed. Output is byte-identical for the same arguments, whatever --workers is.

Files are shortcut-balanced (packrl/tasks/temporal_clue/balance.py): candidates are drawn
until a choice of --n of them (the levels cycling as before) keeps every answer-free name
heuristic of tools/audit_puzzles.py within --shortcut-bound points of chance on every
question kind; that choice, earliest seeds first, is written. The file then passes
`tools/audit_puzzles.py --bound 5`. --shortcut-bound off writes candidates 0..n-1 as drawn.
Levels 7-9 balance since generator 4 (24 of 42 candidates for the shipped large_train); a
set that finds no choice within 5 candidates per kept puzzle stops with an error (a bound
over few questions, e.g. --n 3, is strict). Level 10 is untried.

Levels ("players") 1-10 are presets (packrl/tasks/temporal_clue/config.py); any knob given
here overrides it for every level, and an inconsistent combination is an error naming the
knob. --order curriculum writes the file sorted by measured difficulty (CP-SAT conflicts of
the uniqueness proof, then clue count) instead of generation order.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from packrl.tasks.temporal_clue.balance import select_balanced  # noqa: E402
from packrl.tasks.temporal_clue.config import PRESETS, PuzzleConfig, make_config  # noqa: E402
from packrl.tasks.temporal_clue.files import dumps_record  # noqa: E402
from packrl.tasks.temporal_clue.generate import generate_puzzle  # noqa: E402

SEED_STRIDE = 1_000_000
MAX_POOL = 5  # candidates drawn per kept puzzle before giving up on the bound


def parse_players(text: str) -> list[int]:
    """'1-6' -> [1..6]; '1,3,5' -> [1, 3, 5]; '4' -> [4]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --players {text!r}: use e.g. 3, 1-6 or 1,2,4") from None  # fmt: skip
    bad = [p for p in out if p not in PRESETS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"--players must be within {min(PRESETS)}-{max(PRESETS)}, got {text!r}")  # fmt: skip
    return out


def parse_weights(text: str) -> dict[str, float]:
    """'either=2,iff=1.5,fact' -> {"either": 2.0, "iff": 1.5, "fact": 1.0}."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad --clue-weights entry {part!r}: use family=weight") from None  # fmt: skip
    return out


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")


KNOBS = {  # CLI flag -> (config knob, parser)
    "--suspects": ("suspects", int), "--weapons": ("weapons", int), "--rooms": ("rooms", int),
    "--rows": ("rows", int), "--cols": ("cols", int), "--times": ("times", int),
    "--motives": ("motives", int), "--map": ("map", str), "--bonus": ("bonus", int),
    "--bonus-kinds": ("bonus_kinds", _names), "--given": ("given", _names),
    "--clue-weights": ("clue_weights", parse_weights),
}  # fmt: skip


def configs(levels: list[int], knobs: dict) -> dict[int, PuzzleConfig]:
    """One checked config per level; ValueError names the bad knob."""
    return {p: make_config(p, **knobs) for p in sorted(set(levels))}


def _one(job: tuple[int, PuzzleConfig]) -> str:
    seed, cfg = job
    return dumps_record(generate_puzzle(seed, config=cfg))


def parse_bound(text: str) -> float | None:
    """'4' -> 0.04; 'off' -> None."""
    if text == "off":
        return None
    try:
        points = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --shortcut-bound {text!r}: points, e.g. 4, or off") from None  # fmt: skip
    if not 0 <= points <= 100:
        raise argparse.ArgumentTypeError(f"--shortcut-bound must be in 0..100 points, got {text!r}")  # fmt: skip
    return points / 100


Candidate = tuple[str, dict]  # (JSONL line, its record), parsed once


def in_slot_order(kept: list[Candidate], levels: list[int]) -> list[Candidate]:
    """Kept candidates (seed order) rearranged so number j has level levels[j % len(levels)]."""
    queues: dict[int, list[Candidate]] = {}
    for cand in kept:
        queues.setdefault(cand[1]["players"], []).append(cand)
    return [queues[levels[j % len(levels)]].pop(0) for j in range(len(kept))]


def curriculum_key(cand: Candidate) -> tuple:
    """Sort key: measured difficulty (conflicts of the uniqueness proof, clues), then id."""
    d = cand[1]
    return (d["difficulty"]["conflicts"], d["difficulty"]["clues"], d["id"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--n", type=int, default=64, help="number of puzzles (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ap.add_argument("--players", "--difficulty", type=parse_players, default=parse_players("1-6"),
                    help="difficulties 1-6 to cycle through, e.g. 3, 1-6 or 1,2 (default 1-6)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes (default: all cores)")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="output JSONL path")
    ap.add_argument("--order", choices=["generated", "curriculum"], default="generated",
                    help="curriculum: sort the file from easiest to hardest measured difficulty")  # fmt: skip
    ap.add_argument("--shortcut-bound", type=parse_bound, default=parse_bound("4"),
                    help="keep answer-free name heuristics within this many points of chance on "
                    "every question kind over the file (default 4), or off")  # fmt: skip
    knobs = ap.add_argument_group("knobs (override the level presets)")
    for flag, (knob, typ) in KNOBS.items():
        knobs.add_argument(flag, dest=knob, type=typ, default=None, help=f"the {knob!r} knob")
    knobs.add_argument("--victim-moves", dest="victim_moves", action=argparse.BooleanOptionalAction,
                       default=None, help="the victim walks until the murder (victim clues)")  # fmt: skip
    args = ap.parse_args(argv)
    overrides = {k: getattr(args, k) for k, _ in [*KNOBS.values(), ("victim_moves", None)]}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfgs = configs(args.players, overrides)
    except ValueError as e:
        ap.error(str(e))
    if not 0 < args.n <= SEED_STRIDE:
        ap.error(f"--n must be in 1..{SEED_STRIDE}")
    if args.seed < 0 or args.workers < 1:
        ap.error("--seed must be >= 0 and --workers >= 1")

    def job(i: int) -> tuple[int, PuzzleConfig]:
        return args.seed * SEED_STRIDE + i, cfgs[args.players[i % len(args.players)]]

    levels = [args.players[j % len(args.players)] for j in range(args.n)]
    quotas = {lv: levels.count(lv) for lv in set(levels)}
    step = -(-args.n // 4) + len(args.players)  # candidates drawn per round beyond --n
    pool: list[Candidate] = []
    workers = mp.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    with tqdm(total=args.n, desc="puzzles") as bar:
        while True:
            want = args.n if not pool else len(pool) + step
            if want > min(MAX_POOL * args.n, SEED_STRIDE):
                ap.error(f"no {args.n} puzzles within --shortcut-bound in {len(pool)} candidates; "
                         "raise --shortcut-bound, use more --n (a bound over few questions is "
                         "strict), or --shortcut-bound off (puzzles/README.md)")  # fmt: skip
            jobs = [job(i) for i in range(len(pool), want)]
            bar.total = want
            bar.refresh()
            # imap keeps seed order, so output does not depend on timing or --workers
            for line in workers.imap(_one, jobs) if workers else map(_one, jobs):
                pool.append((line, json.loads(line)))
                bar.update()
            if args.shortcut_bound is None:
                kept = pool
                break
            picked = select_balanced([rec for _, rec in pool], quotas, args.shortcut_bound)
            if picked is not None:
                kept = [pool[i] for i in picked]
                break
            bar.set_postfix_str("drawing more candidates to meet --shortcut-bound")
    if workers:
        workers.close()
        workers.join()
    kept = sorted(kept, key=curriculum_key) if args.order == "curriculum" else in_slot_order(kept, args.players)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")  # a killed run leaves the old file whole
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line, _ in kept)
    os.replace(tmp, args.out)
    print(f"wrote {len(kept)} puzzles to {args.out} (kept from {len(pool)} candidates)", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
