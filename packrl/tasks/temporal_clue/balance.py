"""Shortcut-balanced puzzle files: answer-free heuristics held at chance over a whole file.

Each generated puzzle has a unique answer and a minimal clue set, and every entity of an
asked suspect/weapon/motive kind is named, so absence tells nothing. What is left is
statistical and shows only over many puzzles: the clues that pin the murder down tend to
name its room, so the murder room is the most-named room in about a third of the level 1-6
puzzles against a chance of 1 in 6 to 9 (puzzles/README.md, "Answer shortcuts"). No single
puzzle can be repaired for that without giving up minimality, so the file is: from a pool
of generated candidates, `select_balanced` keeps the puzzles for which, summed over the
kept ones, no bounded heuristic (`audit.BOUNDED`) beats chance by more than `bound` on any
question kind. It is a small 0/1 program, solved with CP-SAT:

    variables   x_i in {0, 1}, one per candidate
    quotas      sum of x_i over the candidates of each level = that level's count
    balance     for every question kind k and bounded heuristic h:
                    sum_i x_i * (E_i[k, h] - bound * Q_i[k]) <= 0
    objective   minimize sum_i x_i * i (prefer the earliest seeds)

where Q_i[k] is how many questions of kind k candidate i asks and E_i[k, h] is the sum, over
those questions, of heuristic h's expected score (1/|ties| if the answer is among its picks,
else 0) minus chance (1/|candidates|): exactly what `audit.audit` averages, so a kept file
passes the audit at `bound` by construction, and `tests/test_puzzle_audit.py` checks that
it does with the audit's own code. One worker, a fixed seed and a deterministic time limit
make the choice reproducible: the same pool always gives the same file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ortools.sat.python import cp_model

from packrl.tasks.temporal_clue.audit import BOUNDED, question_scores

Record = dict[str, Any]
SCALE = 1_000_000  # excesses are fractions; CP-SAT wants integers (rounding: 1e-6 per question)
DETERMINISTIC_SECONDS = 20.0  # CP-SAT's deterministic time: the same limit gives the same answer


def shortcut_excess(rec: Record) -> tuple[dict[tuple[str, str], float], Counter[str]]:
    """One record's (kind, heuristic) -> summed excess over chance, and its questions per kind.

    Excess per question = `audit.question_scores`' score minus chance, for the
    `audit.BOUNDED` heuristics only.
    """
    excess: dict[tuple[str, str], float] = {}
    asked: Counter[str] = Counter()
    for q in rec["questions"]:
        kind = q["kind"]
        chance, scores = question_scores(rec, q)
        asked[kind] += 1
        for name in BOUNDED:
            if name in scores:
                excess[kind, name] = excess.get((kind, name), 0.0) + scores[name] - chance
    return excess, asked


def select_balanced(pool: Sequence[Record], quotas: Mapping[int, int], bound: float = 0.04) -> list[int] | None:  # fmt: skip
    """Indices (ascending) of the pool's records to keep, or None if no choice meets `bound`.

    pool: generated records, earliest seed first; quotas: level (``players``) -> how many
    records of that level to keep; bound: allowed excess over chance, as a fraction (0.04 =
    4 points). None means the pool is too small: draw more candidates and call again.
    Raises ValueError if a level has fewer candidates than its quota.
    """
    levels = [rec["players"] for rec in pool]
    for level, want in quotas.items():
        if levels.count(level) < want:
            raise ValueError(f"level {level}: {levels.count(level)} candidates for a quota of {want}")  # fmt: skip
    m = cp_model.CpModel()
    keep = [m.NewBoolVar(f"keep{i}") for i in range(len(pool))]
    for level, want in quotas.items():
        m.Add(sum(x for x, lv in zip(keep, levels, strict=True) if lv == level) == want)
    for i, lv in enumerate(levels):
        if lv not in quotas:
            m.Add(keep[i] == 0)
    terms: dict[tuple[str, str], list] = {}
    for x, rec in zip(keep, pool, strict=True):
        excess, asked = shortcut_excess(rec)
        for (kind, name), e in excess.items():
            coef = round(SCALE * (e - bound * asked[kind]))
            if coef:
                terms.setdefault((kind, name), []).append(coef * x)
    for key in sorted(terms):
        m.Add(sum(terms[key]) <= 0)
    m.Minimize(sum(i * x for i, x in enumerate(keep)))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.max_deterministic_time = DETERMINISTIC_SECONDS
    status = solver.Solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return [i for i, x in enumerate(keep) if solver.Value(x)]
