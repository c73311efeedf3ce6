"""Independent re-check of a puzzle record, from the record alone.

`IntChecker` is a second solver written separately from the generator's Boolean model
(`model.py`): integer room/time/motive variables with element and table constraints, built
only from a record's ``map``, ``rules``, ``scenario`` (names, sizes, the key world),
structured ``clues`` and ``questions``. It shares no code with the generator, so a bug in
one is unlikely to be repeated in the other. Checks:

    key_fits(rec)              the key world obeys the rules and every clue, and agrees
                               with the answer key
    answers_unique(rec, clues) no world satisfying `clues` answers some question differently
    every_clue_needed(rec)     dropping any one clue lets another answer in (minimality)

Old records (schema 1: no ``map``/``rules``) are read as a full grid, a permutation of
motives and a victim that is not tracked.
"""

from __future__ import annotations

from typing import Any

from ortools.sat.python import cp_model

MOVES = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}


class IntChecker:
    def __init__(self, rec: dict[str, Any], clues: list[dict[str, Any]]):
        sc = rec["scenario"]
        rules = rec.get("rules", {})
        self.sc, m = sc, cp_model.CpModel()
        self.m = m
        S, W, R, T = len(sc["suspects"]), len(sc["weapons"]), len(sc["rooms"]), len(sc["times"])
        K = len(sc["motives"])
        self.R, self.T = R, T
        self.room = {n: i for i, n in enumerate(sc["rooms"])}
        self.time = {n: i for i, n in enumerate(sc["times"])}
        self.sus = {n: i for i, n in enumerate(sc["suspects"])}
        self.wep = {n: i for i, n in enumerate(sc["weapons"])}
        self.mot = {n: i for i, n in enumerate(sc["motives"])}
        grid = rec.get("map", {"rows": sc["rows"], "cols": sc["cols"], "cells": sc["rooms"]})
        rows, cols, cells = grid["rows"], grid["cols"], grid["cells"]
        at_cell = {i: self.room[c] for i, c in enumerate(cells) if c is not None}
        cell_of = {r: i for i, r in at_cell.items()}

        def step(r: int, d: str) -> int | None:
            y, x = divmod(cell_of[r], cols)
            y, x = y + MOVES[d][0], x + MOVES[d][1]
            return at_cell.get(y * cols + x) if 0 <= y < rows and 0 <= x < cols else None

        self.step = step
        ok_pairs = [(a, a) for a in range(R)] + [
            (a, b) for a in range(R) for d in MOVES if (b := step(a, d)) is not None
        ]
        self.pos = [[m.NewIntVar(0, R - 1, "") for _ in range(T)] for _ in range(S)]
        self.wpos = [[m.NewIntVar(0, R - 1, "") for _ in range(T)] for _ in range(W)]
        self.motive = [m.NewIntVar(0, K - 1, "") for _ in range(S)]
        self.victim = rules.get("victim", "not_tracked") == "walks_until_murder"
        self.vpos = [m.NewIntVar(0, R - 1, "") for _ in range(T)] if self.victim else []
        for track in [*self.pos, *self.wpos, *([self.vpos] if self.victim else [])]:
            for t in range(T - 1):
                m.AddAllowedAssignments([track[t], track[t + 1]], ok_pairs)
        for wp in self.wpos:  # a weapon that moves has a suspect making the same move
            for t in range(T - 1):
                still = self.eq(wp[t], wp[t + 1])
                carriers = [self.both(self.eq(p[t], wp[t]), self.eq(p[t + 1], wp[t + 1])) for p in self.pos]  # fmt: skip
                m.AddBoolOr([still, *carriers])
        # motives: a permutation, or every motive held at least once
        self.holds = [[self.eq_const(self.motive[s], k) for k in range(K)] for s in range(S)]
        if rules.get("motives", "all_different") == "all_different":
            m.AddAllDifferent(self.motive)
        for k in range(K):
            m.AddBoolOr([self.holds[s][k] for s in range(S)])
        self.holder = []  # some suspect with motive k (the one, where a clue says so)
        for k in range(K):
            h = m.NewIntVar(0, S - 1, "")
            m.AddElement(h, self.motive, k)
            self.holder.append(h)
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
            is_who = self.eq_const(self.who, s)
            m.Add(there != self.where).OnlyEnforceIf(is_who.Not())
        for t in range(T):  # the victim is in the murder room from the murder on
            if self.victim:
                m.Add(self.vpos[t] == self.where).OnlyEnforceIf(self.le_const(self.when, t))
        self.why = m.NewIntVar(0, K - 1, "")
        m.AddElement(self.who, self.motive, self.why)
        given = rules.get("given", sc.get("given", []))
        key = {"who": (self.who, self.sus, "murderer"), "weapon": (self.what, self.wep, "weapon"),
               "room": (self.where, self.room, "room"), "time": (self.when, self.time, "time")}  # fmt: skip
        for g in given:
            if g == "why":
                m.Add(self.why == self.mot[sc["motive_of"][sc["murderer"]]])
            else:
                var, index, field = key[g]
                m.Add(var == index[sc[field]])
        for c in clues:
            m.AddBoolAnd([self.clue(c)])

    # helpers returning reified Booleans
    def eq(self, a, b) -> cp_model.IntVar:
        v = self.m.NewBoolVar("")
        self.m.Add(a == b).OnlyEnforceIf(v)
        self.m.Add(a != b).OnlyEnforceIf(v.Not())
        return v

    eq_const = eq

    def le_const(self, a, b) -> cp_model.IntVar:
        v = self.m.NewBoolVar("")
        self.m.Add(a <= b).OnlyEnforceIf(v)
        self.m.Add(a > b).OnlyEnforceIf(v.Not())
        return v

    def both(self, *xs) -> cp_model.IntVar:
        v = self.m.NewBoolVar("")
        self.m.AddBoolAnd(xs).OnlyEnforceIf(v)
        self.m.AddBoolOr([x.Not() for x in xs]).OnlyEnforceIf(v.Not())
        return v

    def only_holder(self, k: int) -> cp_model.IntVar:
        """Exactly one suspect has motive k."""
        v = self.m.NewBoolVar("")
        total = sum(row[k] for row in self.holds)
        self.m.Add(total == 1).OnlyEnforceIf(v)
        self.m.Add(total != 1).OnlyEnforceIf(v.Not())
        return v

    def where_is(self, subj: dict, t: int):
        kind, m = subj["type"], self.m
        if kind == "suspect":
            return self.pos[self.sus[subj["name"]]][t]
        if kind == "weapon":
            return self.wpos[self.wep[subj["name"]]][t]
        if kind == "victim":
            return self.vpos[t]
        if kind == "murderer":
            index, table = self.who, self.pos
        elif kind == "murder_weapon":
            index, table = self.what, self.wpos
        else:  # a suspect with motive subj["name"] (the only one: see `clue`)
            index, table = self.holder[self.mot[subj["name"]]], self.pos
        v = m.NewIntVar(0, self.R - 1, "")
        m.AddElement(index, [row[t] for row in table], v)
        return v

    def clue(self, c: dict) -> cp_model.IntVar:
        """A Boolean that is true iff the clue holds, including its descriptions' presupposition."""
        core = self._clue(c)
        subs = [c.get("subject"), c.get("weapon"), *c.get("subjects", [])]
        subs += [a.get("subject") for a in c.get("atoms", [])]
        motives = [s["name"] for s in subs if s and s["type"] == "motive"]
        if not motives:
            return core
        return self.both(core, *(self.only_holder(self.mot[n]) for n in motives))

    def _clue(self, c: dict) -> cp_model.IntVar:
        f, m = c["family"], self.m
        if f == "at":
            return self.eq(self.where_is(c["subject"], self.time[c["time"]]), self.room[c["room"]])
        if f == "motive":
            return self.holds[self.sus[c["suspect"]]][self.mot[c["motive"]]]
        if f == "killed":
            var, index = {"weapon": (self.what, self.wep), "room": (self.where, self.room),
                          "time": (self.when, self.time)}[c["what"]]  # fmt: skip
            v = self.eq(var, index[c["value"]])
            return v.Not() if c.get("negated") else v
        if f == "same_motive":
            a, b = (self.motive[self.sus[x]] for x in c["suspects"])
            v = self.eq(a, b)
            return v if c["same"] else v.Not()
        if f in ("either", "iff"):
            a, b = (self._clue(x) for x in c["atoms"])
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
            if t1 != t0 + 1:
                raise ValueError(f"clue {c['text']!r}: next_time is not the time after time")
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
        raise ValueError(f"unknown clue family {f!r}")

    def answer_is(self, q: dict) -> cp_model.IntVar:
        """A Boolean: question q has its key answer."""
        kind, a = q["kind"], q["answer"]
        if kind == "motive_suspect":
            k = self.mot[q["motive"]]
            return self.both(*(
                row[k] if s == self.sus[a] else row[k].Not() for s, row in enumerate(self.holds)
            ))  # fmt: skip
        var, value = {
            "who": lambda: (self.who, self.sus[a]),
            "weapon": lambda: (self.what, self.wep[a]),
            "room": lambda: (self.where, self.room[a]),
            "time": lambda: (self.when, self.time[a]),
            "why": lambda: (self.why, self.mot[a]),
            "suspect_room": lambda: (
                self.pos[self.sus[q["suspect"]]][self.time[q["time"]]],
                self.room[a],
            ),
            "weapon_room": lambda: (
                self.wpos[self.wep[q["weapon"]]][self.time[q["time"]]],
                self.room[a],
            ),
            "victim_room": lambda: (self.vpos[self.time[q["time"]]], self.room[a]),
            "suspect_motive": lambda: (self.motive[self.sus[q["suspect"]]], self.mot[a]),
        }[kind]()
        return self.eq(var, value)

    def solve(self) -> bool:
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = 0
        status = solver.Solve(self.m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.INFEASIBLE):
            raise RuntimeError(f"re-check solver returned {solver.StatusName(status)}")
        return status != cp_model.INFEASIBLE


def key_fits(rec: dict) -> bool:
    """The key's world obeys the rules and all clues, and the answer key agrees with it."""
    ch, sc = IntChecker(rec, rec["clues"]), rec["scenario"]
    for s, rooms in sc["suspect_rooms"].items():
        for t, r in enumerate(rooms):
            ch.m.Add(ch.pos[ch.sus[s]][t] == ch.room[r])
    for w, rooms in sc["weapon_rooms"].items():
        for t, r in enumerate(rooms):
            ch.m.Add(ch.wpos[ch.wep[w]][t] == ch.room[r])
    for t, r in enumerate(sc.get("victim_rooms") or []):
        ch.m.Add(ch.vpos[t] == ch.room[r])
    for s, mo in sc["motive_of"].items():
        ch.m.Add(ch.motive[ch.sus[s]] == ch.mot[mo])
    for var, value in [(ch.who, ch.sus[sc["murderer"]]), (ch.what, ch.wep[sc["weapon"]]),
                       (ch.where, ch.room[sc["room"]]), (ch.when, ch.time[sc["time"]])]:  # fmt: skip
        ch.m.Add(var == value)
    for q in rec["questions"]:
        ch.m.AddBoolAnd([ch.answer_is(q)])
    if rec["solution"] != {q["letter"]: q["answer"] for q in rec["questions"]}:
        return False
    return ch.solve()


def answers_unique(rec: dict, clues: list[dict]) -> bool:
    """No world satisfying `clues` gives a different answer to some asked question."""
    ch = IntChecker(rec, clues)
    ch.m.AddBoolOr([ch.answer_is(q).Not() for q in rec["questions"]])
    return not ch.solve()


def every_clue_needed(rec: dict) -> bool:
    """Removing any single clue lets a second answer in (deletion minimality)."""
    clues = rec["clues"]
    return all(not answers_unique(rec, clues[:i] + clues[i + 1 :]) for i in range(len(clues)))


def recheck(rec: dict, minimal: bool = False) -> list[str]:
    """Problems found in a record (empty when it passes)."""
    problems = []
    if not key_fits(rec):
        problems.append("the key world breaks a rule or a clue, or the key disagrees with it")
    if not answers_unique(rec, rec["clues"]):
        problems.append("another answer fits the clues")
    if minimal and not every_clue_needed(rec):
        problems.append("some clue can be removed without losing unique answers")
    return problems
