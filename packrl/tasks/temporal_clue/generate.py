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

import hashlib
import json
import random
from collections import Counter
from typing import Any

import ortools
from ortools.sat.python import cp_model

from packrl.tasks.temporal_clue.clues import Clue, clue_mix, holds, names_in, sample_clue
from packrl.tasks.temporal_clue.config import PuzzleConfig, preset
from packrl.tasks.temporal_clue.model import PuzzleModel, solver_params
from packrl.tasks.temporal_clue.prompt import (
    MAP_CONVENTION,
    Question,
    giveaway,
    make_prompt,
    make_questions,
    rules_record,
)
from packrl.tasks.temporal_clue.scenario import World, random_world

# Bump when a change makes the same seed give a different puzzle.
GENERATOR_VERSION = "packrl-temporal-clue/2"
SCHEMA_VERSION = 2  # record layout; 2 added config, rules, map, schema_version

POOL_SIZE = 60  # candidate clues drawn at a time
MAX_CLUES = 150  # give up on a world (and draw another) past this many clues
NAMING_ROUNDS = 10  # deletion passes to get every required entity named before a new world
# Question kinds whose answers are interchangeable unless named: an entity that no clue
# names can swap places with another unnamed one of its kind, so unique answers force every
# non-answer to be named, and a never-named entity *is* the answer (docs/temporal_clue.md).
NAMED_ANSWER_KINDS = ("who", "weapon", "why", "suspect_motive", "motive_suspect")
# Among clues that rule out a counterexample, one naming k answers is drawn with relative
# weight ANSWER_NAME_WEIGHT**k: otherwise answers end up the most-named entities of their
# kind (selection chases the answers), an answer shortcut (tools/audit_puzzles.py). Time
# answers are left out: times are named by most clues anyway, and penalising the murder
# time made it the least-named time instead.
ANSWER_NAME_WEIGHT = 0.5


def _draw_pool(rng: random.Random, w: World, mix: dict[str, float], questions: list[Question],
               n: int, seen: set[str]) -> list[tuple[str, Clue]]:  # fmt: skip
    """`n` fresh true clues as (sampler, clue), none stating an asked answer outright."""
    names, weights = list(mix), list(mix.values())
    out = []
    for sampler in rng.choices(names, weights=weights, k=n):
        c = sample_clue(rng, w, sampler)
        if c is None or c["text"] in seen or giveaway(c, questions):
            continue
        seen.add(c["text"])
        out.append((sampler, c))
    return out


def must_name(w: World, questions: list[Question]) -> set[str]:
    """Entities some clue has to name, so that which names are absent tells nothing.

    Every suspect, weapon or motive, for each of these kinds that holds an asked answer
    (naming only the answer would make "any named one" a shortcut where others go unnamed).
    """
    kinds = {q["kind"] for q in questions if q["kind"] in NAMED_ANSWER_KINDS}
    out: set[str] = set()
    if kinds & {"who", "motive_suspect"}:
        out |= set(w.suspects)
    if "weapon" in kinds:
        out |= set(w.weapons)
    if kinds & {"why", "suspect_motive"}:
        out |= set(w.motives)
    return out


def _naming_clue(rng: random.Random, w: World, mix: dict[str, float], questions: list[Question],
                 name: str, seen: set[str]) -> Clue | None:  # fmt: skip
    """A true clue from the mix that names `name` (None if 400 draws find none)."""
    names, weights = list(mix), list(mix.values())
    for sampler in rng.choices(names, weights=weights, k=400):
        c = sample_clue(rng, w, sampler)
        if c is not None and name in names_in(c) and c["text"] not in seen and not giveaway(c, questions):  # fmt: skip
            seen.add(c["text"])
            return c
    return None


def _minimize(model: PuzzleModel, chosen: list[tuple[Clue, Any]], protected: list[Clue],
              rng: random.Random) -> tuple[list[tuple[Clue, Any]], int]:  # fmt: skip
    """Drop every clue whose removal keeps the answers unique; protected clues are tried last.


    Returns the kept (clue, literal) pairs and the number of solves. After a successful
    removal the set shrinks to the solver's unsat core, except that protected clues not yet
    tried stay, so that each gets its own removal test at the end.
    """
    is_protected = {id(c) for c in protected}
    order = [i for i in range(len(chosen)) if id(chosen[i][0]) not in is_protected]
    rng.shuffle(order)
    order += [i for i in range(len(chosen)) if id(chosen[i][0]) in is_protected]
    kept, solves, tried = list(chosen), 0, set()
    for i in order:
        clue, _ = chosen[i]
        tried.add(id(clue))
        if all(x is not clue for x, _ in kept):
            continue
        trial = [(c, e) for c, e in kept if c is not clue]
        feasible, solver = model.solve([e for _, e in trial] + [model.differ])
        solves += 1
        if not feasible:
            core = set(solver.SufficientAssumptionsForInfeasibility())
            kept = [
                (c, e) for c, e in trial
                if e.Index() in core or (id(c) in is_protected and id(c) not in tried)
            ]  # fmt: skip
    return kept, solves


def select_clues(w: World, questions: list[Question], cfg: PuzzleConfig,
                 rng: random.Random) -> tuple[list[Clue], dict[str, int]] | None:  # fmt: skip
    """A minimal clue set under which the asked answers are unique and every answer in
    `must_name` is named by some clue; None if this world gets stuck."""
    model = PuzzleModel(w)
    model.set_questions(questions)
    mix = clue_mix(cfg)
    seen: set[str] = set()
    pool = _draw_pool(rng, w, mix, questions, POOL_SIZE, seen)
    chosen: list[tuple[Clue, Any]] = []  # (clue, enforcement literal)
    protected: list[Clue] = []
    solves = 0
    required = must_name(w, questions)
    answers = {q["answer"] for q in questions if q["kind"] != "time"}  # see ANSWER_NAME_WEIGHT

    def protect_missing(clues: list[Clue]) -> bool:
        named = set().union(*(names_in(c) for c in clues)) if clues else set()
        for name in sorted(required - named):
            c = _naming_clue(rng, w, mix, questions, name, seen)
            if c is None:
                return False
            protected.append(c)
            chosen.append((c, model.add_clue(c)))
        return True

    if not protect_missing([]):
        return None
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
            pool += _draw_pool(rng, w, mix, questions, POOL_SIZE, seen)
        else:
            return None  # no clue family tells this counterexample apart
        samplers = sorted({s for s, _ in killers})
        sampler = rng.choices(samplers, weights=[mix[s] for s in samplers])[0]
        same = [x for x in killers if x[0] == sampler]
        weights = [ANSWER_NAME_WEIGHT ** len(names_in(c) & answers) for _, c in same]
        pick = rng.choices(same, weights=weights)[0]
        pool.remove(pick)
        chosen.append((pick[1], model.add_clue(pick[1])))
        if len(chosen) > MAX_CLUES:
            return None

    # Deletion passes; a pass that leaves an answer unnamed adds a clue naming it, tried last.
    naming_rounds = 0
    for naming_rounds in range(1, NAMING_ROUNDS + 1):  # noqa: B007 (reported below)
        kept, n = _minimize(model, chosen, protected, rng)
        solves += n
        clues = [c for c, _ in kept]
        chosen, protected = list(kept), []
        if not required - set().union(*(names_in(c) for c in clues)):
            break
        if not protect_missing(clues):
            return None
    else:
        return None
    rng.shuffle(clues)
    return clues, {"solves": solves, "candidates": len(seen), "naming_rounds": naming_rounds}


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


def config_id(cfg: PuzzleConfig) -> str:
    """``p<level>`` for a preset, else ``x<level>-<8 hex digits of the config>``."""
    if cfg == preset(cfg.level):
        return f"p{cfg.level}"
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"x{cfg.level}-{digest[:8]}"


def generate_puzzle(seed: int, players: int = 6, config: PuzzleConfig | None = None,
                    max_worlds: int = 50) -> dict[str, Any]:  # fmt: skip
    """One puzzle record (see docs/temporal_clue.md for the fields).

    `config` (see `config.make_config`) sets every knob; without it the preset of level
    `players` is used. Raises RuntimeError if `max_worlds` worlds all get stuck.
    """
    cfg = (config or preset(players)).check()
    rng = random.Random(seed)
    for _ in range(max_worlds):
        w = random_world(rng, cfg)
        questions = make_questions(w, rng, cfg.bonus, cfg.bonus_kinds)
        picked = select_clues(w, questions, cfg, rng)
        if picked is not None:
            break
    else:
        raise RuntimeError(f"seed {seed}: no puzzle found in {max_worlds} worlds")
    clues, stats = picked
    effort = search_effort(w, clues, questions)
    return {
        "id": f"tc-{config_id(cfg)}-{seed}",
        "prompt": make_prompt(w, clues, questions),
        "solution": {q["letter"]: q["answer"] for q in questions},
        "num_clues": len(clues),
        "schema_version": SCHEMA_VERSION,
        "questions": questions,
        "players": cfg.level,
        "seed": seed,
        "sizes": {
            "suspects": len(w.suspects),
            "weapons": len(w.weapons),
            "rooms": len(w.rooms),
            "grid": [w.rows, w.cols],
            "times": len(w.times),
            "motives": len(w.motives),
            "questions": len(questions),
        },  # fmt: skip
        "difficulty": {
            "clues": len(clues),
            "questions": len(questions),
            **effort,
            "families": dict(sorted(Counter(c["family"] for c in clues).items())),
        },
        "generation": stats,
        "config": cfg.to_dict(),
        "rules": rules_record(w),
        "map": {"rows": w.rows, "cols": w.cols, "cells": w.cells, "convention": MAP_CONVENTION},
        "scenario": w.to_dict(),
        "clues": clues,
        "generator_version": GENERATOR_VERSION,
        "ortools_version": ortools.__version__,
    }
