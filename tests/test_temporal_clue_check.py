"""Independent re-check of generated Temporal Clue puzzles.

The checker (`packrl.tasks.temporal_clue.recheck.IntChecker`) is a second solver written
separately from the generator's Boolean model: integer room/time/motive variables, element
and table constraints, built only from the JSON record (map, rules, scenario, structured
clues, questions). It confirms that the answer key's world obeys the rules and every clue,
that no other answer to the asked questions fits the clues, and that every clue is needed.
"""

from __future__ import annotations

import json

import pytest

from packrl.tasks.temporal_clue import generate_puzzle, make_config
from packrl.tasks.temporal_clue.recheck import answers_unique, every_clue_needed, key_fits

# Every feature the levels 1-6 lack, at a size that generates in about a second: a map with
# gaps, shared motives, the victim's walk, motive questions, victim facts.
FEATURES = make_config(
    3, suspects=4, motives=3, rows=2, cols=3, rooms=5, map="irregular", victim_moves=True,
    bonus=3, bonus_kinds=("motive_suspect", "suspect_motive", "victim_room", "suspect_room"),
)  # fmt: skip


@pytest.fixture(scope="module")
def puzzles() -> list[dict]:
    # round-trip through JSON: the checker sees only what a file holds
    recs = [generate_puzzle(11, p) for p in range(1, 7)]
    recs += [generate_puzzle(seed, config=FEATURES) for seed in (11, 12, 13)]
    return [json.loads(json.dumps(r)) for r in recs]


def test_key_satisfies_every_clue(puzzles):
    for rec in puzzles:
        assert key_fits(rec), rec["id"]
        assert rec["solution"] == {q["letter"]: q["answer"] for q in rec["questions"]}


def test_asked_answers_are_unique(puzzles):
    for rec in puzzles:
        assert answers_unique(rec, rec["clues"]), rec["id"]


def test_feature_puzzles_use_the_new_features(puzzles):
    """The FEATURES puzzles exercise what the checker must model, or the checks prove little."""
    feats = puzzles[6:]
    assert all(None in r["map"]["cells"] for r in feats)
    assert all(r["rules"]["victim"] == "walks_until_murder" for r in feats)
    assert all(r["rules"]["motives"] == "shared_each_held" for r in feats)
    kinds = {q["kind"] for r in feats for q in r["questions"]}
    assert {"motive_suspect", "suspect_motive", "victim_room"} <= kinds
    subjects = {
        s["type"] for r in feats for c in r["clues"] for s in [c.get("subject"), *c.get("subjects", [])] if s
    }  # fmt: skip
    assert "victim" in subjects or any(c["family"] == "killed" for r in feats for c in r["clues"])


def test_every_clue_is_needed(puzzles):
    """Removing any one clue makes the checker find a second answer (so it would fail)."""
    for rec in puzzles[:4] + puzzles[6:]:
        assert every_clue_needed(rec), rec["id"]


def test_checker_rejects_a_false_clue(puzzles):
    """The key check is not vacuous: a clue contradicting the key world is caught."""
    for rec in (puzzles[4], puzzles[6]):
        rec = json.loads(json.dumps(rec))
        sc = rec["scenario"]
        s = sc["suspects"][0]
        wrong = next(r for r in sc["rooms"] if r != sc["suspect_rooms"][s][0])
        rec["clues"].append({"family": "at", "subject": {"type": "suspect", "name": s},
                             "room": wrong, "time": sc["times"][0]})  # fmt: skip
        assert not key_fits(rec)


def test_checker_reads_the_map_from_the_record(puzzles):
    """A direction clue that is true on the record's map is false once a gap is filled
    differently: the checker follows ``map.cells``, not a full grid."""
    rec = json.loads(json.dumps(puzzles[6]))
    cells = rec["map"]["cells"]
    gap, room = cells.index(None), next(i for i, c in enumerate(cells) if c is not None)
    moved = list(cells)
    moved[gap], moved[room] = moved[room], None
    rec["map"]["cells"] = moved
    rec["clues"] = []
    ok = key_fits(rec)  # with no clues, the key fits iff its walks are legal on the map
    walks_legal = True
    pos = {c: i for i, c in enumerate(moved) if c is not None}
    cols = rec["map"]["cols"]
    for track in [*rec["scenario"]["suspect_rooms"].values(), rec["scenario"]["victim_rooms"]]:
        for a, b in zip(track, track[1:], strict=False):
            (ya, xa), (yb, xb) = divmod(pos[a], cols), divmod(pos[b], cols)
            walks_legal &= abs(ya - yb) + abs(xa - xb) <= 1
    assert ok == walks_legal
