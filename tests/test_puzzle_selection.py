"""Clue selection (packrl/tasks/temporal_clue/selection.py): the counterexample bank is exact,
and selected sets are unique, minimal and name every required entity.

The bank answers deletion tests without a solve when a known counterexample satisfies the
remaining clues. That is only sound if `clues.holds` says exactly what the CP-SAT encoding
says, so the first test checks every clue the selection used against the model, in the
counterexample worlds it found. A small config with every feature of levels 7-10 (map gaps,
shared motives, the victim's walk, motive and victim questions) keeps it to seconds.
"""

from __future__ import annotations

import random

import pytest

from packrl.tasks.temporal_clue import make_config
from packrl.tasks.temporal_clue.clues import holds, names_in
from packrl.tasks.temporal_clue.generate import generate_puzzle
from packrl.tasks.temporal_clue.model import PuzzleModel
from packrl.tasks.temporal_clue.prompt import make_questions
from packrl.tasks.temporal_clue.recheck import answers_unique, every_clue_needed
from packrl.tasks.temporal_clue.scenario import World, random_world
from packrl.tasks.temporal_clue.selection import Selector, must_name

FEATURES = make_config(
    3, suspects=5, motives=3, weapons=4, rows=2, cols=3, rooms=5, map="irregular",
    victim_moves=True, times=5, bonus=4,
    bonus_kinds=("motive_suspect", "suspect_motive", "victim_room", "suspect_room", "weapon_room"),
)  # fmt: skip


def world_literals(model: PuzzleModel, w: World) -> list:
    """Assumptions that pin the model to world `w` (every one-hot group's true member)."""
    lits = [model.loc[model.si[s]][t][model.ri[r]] for s in w.suspects
            for t, r in enumerate(w.suspect_rooms[s])]  # fmt: skip
    lits += [model.wloc[model.wi[x]][t][model.ri[r]] for x in w.weapons
             for t, r in enumerate(w.weapon_rooms[x])]  # fmt: skip
    lits += [model.vloc[t][model.ri[r]] for t, r in enumerate(w.victim_rooms)]
    lits += [model.mot[model.si[s]][model.mi[m]] for s, m in w.motive_of.items()]
    lits += [model.who[model.si[w.murderer]], model.what[model.wi[w.weapon]],
             model.where[model.ri[w.room]], model.when[model.ti[w.time]]]  # fmt: skip
    return lits


def test_holds_agrees_with_the_model_in_banked_counterexamples():
    rng = random.Random(3)
    w = random_world(rng, FEATURES)
    questions = make_questions(w, rng, FEATURES.bonus, FEATURES.bonus_kinds)
    sel = Selector(w, questions, FEATURES, rng)
    assert sel.select() is not None
    clues = [c for c, _ in sel.lit.values()]
    assert len(sel.bank) >= 5 and len(clues) >= 10
    checked = {True: 0, False: 0}
    for cw in sel.bank[:: max(1, len(sel.bank) // 6)]:
        pinned = world_literals(sel.model, cw)
        feasible, _ = sel.model.solve(pinned)
        assert feasible  # a banked world obeys the rules
        for c, lit in sel.lit.values():
            truth = holds(c, cw)
            assert sel.model.solve([*pinned, lit])[0] == truth, c["text"]
            checked[truth] += 1
    assert checked[True] > 10 and checked[False] > 10  # both directions were exercised


@pytest.fixture(scope="module")
def feature_puzzles() -> list[dict]:
    return [generate_puzzle(seed, config=FEATURES) for seed in (21, 22, 23)]


def test_selected_sets_are_unique_minimal_and_name_every_required_entity(feature_puzzles):
    for rec in feature_puzzles:
        w = World.from_dict(rec["scenario"])
        named = set().union(*(names_in(c) for c in rec["clues"]))
        assert must_name(w, rec["questions"]) <= named, rec["id"]
        assert answers_unique(rec, rec["clues"]), rec["id"]
        assert every_clue_needed(rec), rec["id"]


def test_same_seed_same_record_after_other_work(feature_puzzles):
    """Selection caches clue truths by object id; a reused id must not change the result."""
    from packrl.tasks.temporal_clue.files import dumps_record

    again = generate_puzzle(21, config=FEATURES)
    assert dumps_record(again) == dumps_record(feature_puzzles[0])
