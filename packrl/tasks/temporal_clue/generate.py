"""Puzzle generation: draw a world, ask questions, pick a minimal clue set with CP-SAT.

`selection.select_clues` picks the clues (counterexample-guided, then deletion down to a
minimal set that names every entity of an asked kind); a world it gets stuck on is
redrawn. All of it runs on one model with switched clues, on one solver worker, with no
time limits: the same seed gives the same puzzle.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import Any

import ortools
from ortools.sat.python import cp_model

from packrl.tasks.temporal_clue.clues import Clue
from packrl.tasks.temporal_clue.config import PuzzleConfig, preset
from packrl.tasks.temporal_clue.model import PuzzleModel, solver_params
from packrl.tasks.temporal_clue.prompt import (
    MAP_CONVENTION,
    Question,
    make_prompt,
    make_questions,
    rules_record,
)
from packrl.tasks.temporal_clue.scenario import World, random_world
from packrl.tasks.temporal_clue.selection import NAMED_ANSWER_KINDS, must_name, select_clues

__all__ = ["GENERATOR_VERSION", "NAMED_ANSWER_KINDS", "SCHEMA_VERSION", "generate_puzzle",
           "must_name", "search_effort", "select_clues"]  # fmt: skip

# Bump when a change makes the same seed give a different puzzle.
GENERATOR_VERSION = "packrl-temporal-clue/4"
SCHEMA_VERSION = 2  # record layout; 2 added config, rules, map, schema_version


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
    worlds, solves_total = 0, 0  # over every world drawn, the stuck ones included
    for worlds in range(1, max_worlds + 1):  # noqa: B007 (reported below)
        w = random_world(rng, cfg)
        questions = make_questions(w, rng, cfg.bonus, cfg.bonus_kinds)
        clues, stats = select_clues(w, questions, cfg, rng)
        solves_total += stats["solves"]
        if clues is not None:
            break
    else:
        raise RuntimeError(f"seed {seed}: no puzzle found in {max_worlds} worlds")
    stats = {**stats, "worlds": worlds, "solves_total": solves_total}
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
