"""Independent re-check of generated Temporal Clue puzzles.

`IntChecker` is a second solver written separately from the generator's Boolean model
(packrl/tasks/temporal_clue/model.py): integer room/time/motive variables, element and
table constraints, built only from the JSON record (scenario sizes, structured clues,
questions). It confirms that the answer key's world obeys the rules and every clue, that no
other answer to the asked questions fits the clues, and that every clue is needed.
"""

from __future__ import annotations

import json

import pytest
from ortools.sat.python import cp_model

from packrl.tasks.temporal_clue import generate_puzzle

MOVES = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}


class IntChecker:
    def __init__(self, rec: dict, clues: list[dict]):
        sc = rec["scenario"]
        self.sc, m = sc, cp_model.CpModel()
        self.m = m
        S, W, R, T = len(sc["suspects"]), len(sc["weapons"]), len(sc["rooms"]), len(sc["times"])
        self.R, self.T = R, T
        self.room = {n: i for i, n in enumerate(sc["rooms"])}
        self.time = {n: i for i, n in enumerate(sc["times"])}
        self.sus = {n: i for i, n in enumerate(sc["suspects"])}
        self.wep = {n: i for i, n in enumerate(sc["weapons"])}
        self.mot = {n: i for i, n in enumerate(sc["motives"])}
        rows, cols = sc["rows"], sc["cols"]

        def step(r: int, d: str) -> int | None:
            y, x = divmod(r, cols)
            y, x = y + MOVES[d][0], x + MOVES[d][1]
            return y * cols + x if 0 <= y < rows and 0 <= x < cols else None

        self.step = step
        ok_pairs = [(a, a) for a in range(R)] + [
            (a, b) for a in range(R) for d in MOVES if (b := step(a, d)) is not None
        ]
        self.pos = [[m.NewIntVar(0, R - 1, "") for _ in range(T)] for _ in range(S)]
        self.wpos = [[m.NewIntVar(0, R - 1, "") for _ in range(T)] for _ in range(W)]
        self.motive = [m.NewIntVar(0, S - 1, "") for _ in range(S)]
        self.holder = [m.NewIntVar(0, S - 1, "") for _ in range(S)]
        m.AddInverse(self.motive, self.holder)
        for track in self.pos + self.wpos:
            for t in range(T - 1):
                m.AddAllowedAssignments([track[t], track[t + 1]], ok_pairs)
        for wp in self.wpos:  # a weapon that moves has a suspect making the same move
            for t in range(T - 1):
                still = self.eq(wp[t], wp[t + 1])
                carriers = [self.both(self.eq(p[t], wp[t]), self.eq(p[t + 1], wp[t + 1])) for p in self.pos]  # fmt: skip
                m.AddBoolOr([still, *carriers])
        self.who = m.NewIntVar(0, S - 1, "")
        self.what = m.NewIntVar(0, W - 1, "")
        self.where = m.NewIntVar(0, R - 1, "")
        self.when = m.NewIntVar(0, T - 1, "")
        flat = [self.pos[s][t] for s in range(S) for t in range(T)]
        wflat = [self.wpos[w][t] for w in range(W) for t in range(T)]
        i1, i2 = m.NewIntVar(0, S * T - 1, ""), m.NewIntVar(0, W * T - 1, "")
        m.Add(i1 == self.who * T + self.when)
        m.Add(i2 == self.what * T + self.when)
        m.AddElement(i1, flat, self.where)
        m.AddElement(i2, wflat, self.where)
        for s in range(S):  # nobody else in the murder room at the murder time
            there = m.NewIntVar(0, R - 1, "")
            m.AddElement(self.when, self.pos[s], there)
            is_who = m.NewBoolVar("")
            m.Add(self.who == s).OnlyEnforceIf(is_who)
            m.Add(self.who != s).OnlyEnforceIf(is_who.Not())
            m.Add(there != self.where).OnlyEnforceIf(is_who.Not())
        if "time" in sc["given"]:
            m.Add(self.when == self.time[sc["time"]])
        if "room" in sc["given"]:
            m.Add(self.where == self.room[sc["room"]])
        for c in clues:
            m.AddBoolAnd([self.clue(c)])

    # helpers returning reified Booleans
    def eq(self, a, b) -> cp_model.IntVar:
        v = self.m.NewBoolVar("")
        self.m.Add(a == b).OnlyEnforceIf(v)
        self.m.Add(a != b).OnlyEnforceIf(v.Not())
        return v

    def both(self, *xs) -> cp_model.IntVar:
        v = self.m.NewBoolVar("")
        self.m.AddBoolAnd(xs).OnlyEnforceIf(v)
        self.m.AddBoolOr([x.Not() for x in xs]).OnlyEnforceIf(v.Not())
        return v

    def where_is(self, subj: dict, t: int):
        kind, m = subj["type"], self.m
        if kind == "suspect":
            return self.pos[self.sus[subj["name"]]][t]
        if kind == "weapon":
            return self.wpos[self.wep[subj["name"]]][t]
        if kind == "murderer":
            index, table = self.who, self.pos
        elif kind == "murder_weapon":
            index, table = self.what, self.wpos
        else:  # the suspect with motive subj["name"]
            index, table = self.holder[self.mot[subj["name"]]], self.pos
        v = m.NewIntVar(0, self.R - 1, "")
        m.AddElement(index, [row[t] for row in table], v)
        return v

    def clue(self, c: dict) -> cp_model.IntVar:
        f, m = c["family"], self.m
        if f == "at":
            return self.eq(self.where_is(c["subject"], self.time[c["time"]]), self.room[c["room"]])
        if f == "motive":
            return self.eq(self.motive[self.sus[c["suspect"]]], self.mot[c["motive"]])
        if f in ("either", "iff"):
            a, b = (self.clue(x) for x in c["atoms"])
            v = m.NewBoolVar("")
            if f == "either":
                m.Add(a + b == 1).OnlyEnforceIf(v)
                m.Add(a + b != 1).OnlyEnforceIf(v.Not())
            else:
                m.Add(a == b).OnlyEnforceIf(v)
                m.Add(a != b).OnlyEnforceIf(v.Not())
            return v
        if f == "same_room":
            t = self.time[c["time"]]
            return self.eq(*(self.where_is(s, t) for s in c["subjects"]))
        if f == "together":
            r = self.room[c["room"]]
            hits = [
                self.both(*(self.eq(self.where_is(s, t), r) for s in c["subjects"]))
                for t in range(self.T)
            ]
            v = m.NewBoolVar("")
            m.AddMaxEquality(v, hits)
            return v
        if f in ("moved", "carried"):
            t0, t1 = self.time[c["time"]], self.time[c["next_time"]]
            assert t1 == t0 + 1, c
            movers = [c["subject"]] + ([c["weapon"]] if f == "carried" else [])
            return self.both(*(
                x for s in movers for x in (
                    self.eq(self.where_is(s, t0), self.room[c["from"]]),
                    self.eq(self.where_is(s, t1), self.room[c["to"]]),
                )
            ))  # fmt: skip
        if f == "direction":
            t = self.time[c["time"]]
            a, b = (self.where_is(s, t) for s in c["subjects"])
            v = m.NewBoolVar("")
            pairs = [(self.step(r, c["direction"]), r) for r in range(self.R)]
            pairs = [p for p in pairs if p[0] is not None]
            m.AddAllowedAssignments([a, b], pairs).OnlyEnforceIf(v)
            m.AddForbiddenAssignments([a, b], pairs).OnlyEnforceIf(v.Not())
            return v
        if f == "murder_room":
            return self.eq(self.where_is(c["subject"], self.time[c["time"]]), self.where)
        if f == "murder_time":
            v, t = m.NewBoolVar(""), self.time[c["time"]]
            if c["relation"] == "before":
                m.Add(self.when < t).OnlyEnforceIf(v)
                m.Add(self.when >= t).OnlyEnforceIf(v.Not())
            else:
                m.Add(self.when > t).OnlyEnforceIf(v)
                m.Add(self.when <= t).OnlyEnforceIf(v.Not())
            return v
        raise AssertionError(f"unknown family {f}")

    def answer_var(self, q: dict):
        kind = q["kind"]
        if kind == "who":
            return self.who, self.sus[q["answer"]]
        if kind == "weapon":
            return self.what, self.wep[q["answer"]]
        if kind == "room":
            return self.where, self.room[q["answer"]]
        if kind == "time":
            return self.when, self.time[q["answer"]]
        if kind == "why":
            v = self.m.NewIntVar(0, len(self.mot) - 1, "")
            self.m.AddElement(self.who, self.motive, v)
            return v, self.mot[q["answer"]]
        if kind == "suspect_room":
            return self.pos[self.sus[q["suspect"]]][self.time[q["time"]]], self.room[q["answer"]]
        if kind == "weapon_room":
            return self.wpos[self.wep[q["weapon"]]][self.time[q["time"]]], self.room[q["answer"]]
        if kind == "suspect_motive":
            return self.motive[self.sus[q["suspect"]]], self.mot[q["answer"]]
        raise AssertionError(kind)

    def solve(self) -> bool:
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        return solver.Solve(self.m) in (cp_model.OPTIMAL, cp_model.FEASIBLE)


def key_fits(rec: dict) -> bool:
    """The key's world obeys the rules and all clues."""
    ch, sc = IntChecker(rec, rec["clues"]), rec["scenario"]
    for s, rooms in sc["suspect_rooms"].items():
        for t, r in enumerate(rooms):
            ch.m.Add(ch.pos[ch.sus[s]][t] == ch.room[r])
    for w, rooms in sc["weapon_rooms"].items():
        for t, r in enumerate(rooms):
            ch.m.Add(ch.wpos[ch.wep[w]][t] == ch.room[r])
    for s, mo in sc["motive_of"].items():
        ch.m.Add(ch.motive[ch.sus[s]] == ch.mot[mo])
    for var, value in [(ch.who, ch.sus[sc["murderer"]]), (ch.what, ch.wep[sc["weapon"]]),
                       (ch.where, ch.room[sc["room"]]), (ch.when, ch.time[sc["time"]])]:  # fmt: skip
        ch.m.Add(var == value)
    for q in rec["questions"]:  # the key agrees with the world
        var, value = ch.answer_var(q)
        ch.m.Add(var == value)
    return ch.solve()


def answers_unique(rec: dict, clues: list[dict]) -> bool:
    """No world satisfying `clues` gives a different answer to some asked question."""
    ch = IntChecker(rec, clues)
    differs = []
    for q in rec["questions"]:
        var, value = ch.answer_var(q)
        differs.append(ch.eq(var, value).Not())
    ch.m.AddBoolOr(differs)
    return not ch.solve()


@pytest.fixture(scope="module")
def puzzles() -> list[dict]:
    # round-trip through JSON: the checker sees only what a file holds
    return [
        json.loads(json.dumps(generate_puzzle(seed, p))) for p in range(1, 7) for seed in (11, 12)
    ]


def test_key_satisfies_every_clue(puzzles):
    for rec in puzzles:
        assert key_fits(rec), rec["id"]
        assert rec["solution"] == {q["letter"]: q["answer"] for q in rec["questions"]}


def test_asked_answers_are_unique(puzzles):
    for rec in puzzles:
        assert answers_unique(rec, rec["clues"]), rec["id"]


@pytest.mark.slow
def test_every_clue_is_needed(puzzles):
    """Removing any one clue makes the checker find a second answer (so it would fail)."""
    for rec in puzzles[:6] + puzzles[-2:]:
        for i in range(len(rec["clues"])):
            fewer = rec["clues"][:i] + rec["clues"][i + 1 :]
            assert not answers_unique(rec, fewer), (rec["id"], rec["clues"][i]["text"])


def test_checker_rejects_a_false_clue(puzzles):
    """The key check is not vacuous: a clue contradicting the key world is caught."""
    rec = json.loads(json.dumps(puzzles[4]))
    sc = rec["scenario"]
    s = sc["suspects"][0]
    wrong = next(r for r in sc["rooms"] if r != sc["suspect_rooms"][s][0])
    rec["clues"].append({"family": "at", "subject": {"type": "suspect", "name": s},
                         "room": wrong, "time": sc["times"][0]})  # fmt: skip
    assert not key_fits(rec)
