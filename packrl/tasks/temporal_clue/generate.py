"""Puzzle generation: draw a world, ask questions, pick a minimal clue set with CP-SAT.

Selection is counterexample-guided. Ask CP-SAT for a world that satisfies the chosen clues
but differs in some asked answer; if one exists, add a true clue that this counterexample
violates (drawn by the difficulty's clue mix) and ask again. When no counterexample exists
the answers are unique. Then every clue is tried for removal (shrinking to the solver's
unsat core when it can), so no clue in the final set is removable. All of it runs on one
model with switched clues, on one solver worker, with no time limits: the same seed gives
the same puzzle.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import ortools
from ortools.sat.python import cp_model

from packrl.tasks.temporal_clue.clues import Clue, clue_mix, holds, sample_clue
from packrl.tasks.temporal_clue.model import PuzzleModel, solver_params
from packrl.tasks.temporal_clue.prompt import Question, giveaway, make_prompt, make_questions
from packrl.tasks.temporal_clue.scenario import World, random_world, sizes_for

# Bump when a change makes the same seed give a different puzzle.
GENERATOR_VERSION = "packrl-temporal-clue/1"

POOL_SIZE = 60  # candidate clues drawn at a time
MAX_CLUES = 80  # give up on a world (and draw another) past this many clues


def _draw_pool(rng: random.Random, w: World, players: int, questions: list[Question],
               n: int, seen: set[str]) -> list[tuple[str, Clue]]:  # fmt: skip
    """`n` fresh true clues as (sampler, clue), none stating an asked answer outright."""
    mix = clue_mix(players)
    names, weights = list(mix), list(mix.values())
    out = []
    for sampler in rng.choices(names, weights=weights, k=n):
        c = sample_clue(rng, w, sampler)
        if c is None or c["text"] in seen or giveaway(c, questions):
            continue
        seen.add(c["text"])
        out.append((sampler, c))
    return out


def select_clues(w: World, questions: list[Question], players: int,
                 rng: random.Random) -> tuple[list[Clue], dict[str, int]] | None:  # fmt: skip
    """A minimal clue set under which the asked answers are unique, or None if stuck."""
    model = PuzzleModel(w)
    model.set_questions(questions)
    mix = clue_mix(players)
    seen: set[str] = set()
    pool = _draw_pool(rng, w, players, questions, POOL_SIZE, seen)
    chosen: list[tuple[Clue, Any]] = []  # (clue, enforcement literal)
    solves = 0

    while True:
        feasible, solver = model.solve([e for _, e in chosen] + [model.differ])
        solves += 1
        if not feasible:
            break
        counter = model.world_from(solver)
        for _ in range(5):
            killers = [(s, c) for s, c in pool if not holds(c, counter)]
            if killers:
                break
            pool += _draw_pool(rng, w, players, questions, POOL_SIZE, seen)
        else:
            return None  # no clue family tells this counterexample apart
        samplers = sorted({s for s, _ in killers})
        sampler = rng.choices(samplers, weights=[mix[s] for s in samplers])[0]
        pick = rng.choice([x for x in killers if x[0] == sampler])
        pool.remove(pick)
        chosen.append((pick[1], model.add_clue(pick[1])))
        if len(chosen) > MAX_CLUES:
            return None

    # Deletion pass: drop every clue whose removal keeps the answers unique.
    kept = list(chosen)
    order = list(range(len(chosen)))
    rng.shuffle(order)
    for i in order:
        clue, lit = chosen[i]
        if all(x is not clue for x, _ in kept):
            continue
        trial = [(c, e) for c, e in kept if c is not clue]
        feasible, solver = model.solve([e for _, e in trial] + [model.differ])
        solves += 1
        if not feasible:
            core = set(solver.SufficientAssumptionsForInfeasibility())
            kept = [(c, e) for c, e in trial if e.Index() in core]
    clues = [c for c, _ in kept]
    rng.shuffle(clues)
    return clues, {"solves": solves, "candidates": len(seen)}


def search_effort(w: World, clues: list[Clue], questions: list[Question]) -> dict[str, int]:
    """How hard the uniqueness proof is for a fresh solver (no presolve, see `solver_params`).

    A measured difficulty: conflicts and branches CP-SAT needs to show that no other
    answer fits the clues (deterministic: one worker, fixed seed).
    """
    model = PuzzleModel(w)
    model.set_questions(questions)
    lits = [model.add_clue(c) for c in clues]
    model.m.AddAssumptions([*lits, model.differ])
    solver = solver_params(cp_model.CpSolver())
    status = solver.Solve(model.m)
    if status != cp_model.INFEASIBLE:
        raise AssertionError("generated puzzle is not unique: this is a generator bug")
    return {"conflicts": int(solver.NumConflicts()), "branches": int(solver.NumBranches())}


def generate_puzzle(seed: int, players: int, max_worlds: int = 50) -> dict[str, Any]:
    """One puzzle record (see docs/temporal_clue.md for the fields)."""
    sizes = sizes_for(players)
    rng = random.Random(seed)
    for _ in range(max_worlds):
        w = random_world(rng, players)
        questions = make_questions(w, rng, sizes.bonus)
        picked = select_clues(w, questions, players, rng)
        if picked is not None:
            break
    else:
        raise RuntimeError(f"seed {seed}: no puzzle found in {max_worlds} worlds")
    clues, stats = picked
    effort = search_effort(w, clues, questions)
    return {
        "id": f"tc-p{players}-{seed}",
        "prompt": make_prompt(w, clues, questions),
        "solution": {q["letter"]: q["answer"] for q in questions},
        "num_clues": len(clues),
        "questions": questions,
        "players": players,
        "seed": seed,
        "sizes": {
            "suspects": len(w.suspects),
            "weapons": len(w.weapons),
            "rooms": len(w.rooms),
            "grid": [w.rows, w.cols],
            "times": len(w.times),
            "questions": len(questions),
        },  # fmt: skip
        "difficulty": {
            "clues": len(clues),
            "questions": len(questions),
            **effort,
            "families": dict(sorted(Counter(c["family"] for c in clues).items())),
        },
        "generation": stats,
        "scenario": w.to_dict(),
        "clues": clues,
        "generator_version": GENERATOR_VERSION,
        "ortools_version": ortools.__version__,
    }
