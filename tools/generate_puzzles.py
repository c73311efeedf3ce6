"""Generate Temporal Clue puzzles as JSONL.

    python tools/generate_puzzles.py --n 64 --seed 1 --players 1-6 --workers 2 --out puzzles/x.jsonl

Puzzle i gets difficulty players[i % len(players)] and seed ``seed * 1_000_000 + i``, so a
file is reproducible from its command, and files made with different --seed never share a
puzzle seed. Output is byte-identical for the same arguments, whatever --workers is.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from packrl.tasks.temporal_clue.files import dumps_record  # noqa: E402
from packrl.tasks.temporal_clue.generate import generate_puzzle  # noqa: E402
from packrl.tasks.temporal_clue.scenario import SIZES  # noqa: E402

SEED_STRIDE = 1_000_000


def parse_players(text: str) -> list[int]:
    """'1-6' -> [1..6]; '1,3,5' -> [1, 3, 5]; '4' -> [4]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --players {text!r}: use e.g. 3, 1-6 or 1,2,4") from None  # fmt: skip
    bad = [p for p in out if p not in SIZES]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"--players must be within {min(SIZES)}-{max(SIZES)}, got {text!r}")  # fmt: skip
    return out


def _one(job: tuple[int, int]) -> str:
    seed, players = job
    return dumps_record(generate_puzzle(seed, players))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--n", type=int, default=64, help="number of puzzles (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ap.add_argument("--players", "--difficulty", type=parse_players, default=parse_players("1-6"),
                    help="difficulties 1-6 to cycle through, e.g. 3, 1-6 or 1,2 (default 1-6)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes (default: all cores)")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True, help="output JSONL path")
    args = ap.parse_args(argv)
    if not 0 < args.n <= SEED_STRIDE:
        ap.error(f"--n must be in 1..{SEED_STRIDE}")
    if args.seed < 0 or args.workers < 1:
        ap.error("--seed must be >= 0 and --workers >= 1")

    jobs = [
        (args.seed * SEED_STRIDE + i, args.players[i % len(args.players)]) for i in range(args.n)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f, tqdm(total=len(jobs), desc="puzzles") as bar:
        if args.workers == 1:
            lines = map(_one, jobs)
        else:
            pool = mp.get_context("spawn").Pool(args.workers)
            lines = pool.imap(_one, jobs)  # in order, so output does not depend on timing
        for line in lines:
            f.write(line + "\n")
            bar.update()
        if args.workers > 1:
            pool.close()
            pool.join()
    print(f"wrote {len(jobs)} puzzles to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
