"""The CP-SAT model of a puzzle: the rules as hard constraints, each clue behind a switch.

The model is built once per puzzle. Every clue added gets an enforcement literal, and a
solve turns a chosen set of clues on through solver assumptions, so selection never
rebuilds the model. Questions are one-hot answer variables; `set_questions` adds one more
switch, ``differ``, that forces at least one asked answer away from the truth. With the
selected clues and ``differ`` assumed, INFEASIBLE proves the asked answers unique.

Solves are deterministic: one worker, a fixed seed and no time limit.
"""

from __future__ import annotations

from typing import Any

from ortools.sat.python import cp_model

from packrl.tasks.temporal_clue.clues import Clue, Subject, motive_subjects
from packrl.tasks.temporal_clue.scenario import World

Lit = Any  # a CP-SAT Boolean literal (IntVar or its negation)


def solver_params(solver: cp_model.CpSolver) -> cp_model.CpSolver:
    """Single worker, fixed seed, no time limit: the same model always gives the same answer.

    Presolve, the LP relaxation, probing and symmetry detection are off: these models are
    mostly clauses, solved hundreds of times with different assumptions, and each of these
    steps costs more per solve than the search it saves (presolve and LP: 2.6-4.4x more CPU
    with them on, tools/bench_puzzles.py --compare-defaults; probing and symmetry: 4.2x more
    CPU in the solves of a level-8 puzzle, same solves timed both ways, docs/benchmarks.md).
    """
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.cp_model_presolve = False
    solver.parameters.linearization_level = 0
    solver.parameters.cp_model_probing_level = 0
    solver.parameters.symmetry_level = 0
    return solver


class PuzzleModel:
    """Boolean CP-SAT encoding of a world's rules, with switchable clues.

    Variables (all Boolean, one-hot where it says so):
        loc[s][t][r]   suspect s is in room r at time t      (one-hot over r)
        wloc[w][t][r]  weapon w is in room r at time t       (one-hot over r)
        mot[s][m]      suspect s has motive m                (one-hot over m; every m held)
        vloc[t][r]     the victim is in room r at time t     (only when the victim moves)
        who[s], what[w], where[r], when[t]: the murder      (each one-hot)
        why[m]         the murderer's motive
    """

    def __init__(self, world: World):
        self.world = w = world
        m = self.m = cp_model.CpModel()
        S, W, R = range(len(w.suspects)), range(len(w.weapons)), range(len(w.rooms))
        T, M = range(len(w.times)), range(len(w.motives))
        self.si = {n: i for i, n in enumerate(w.suspects)}
        self.wi = {n: i for i, n in enumerate(w.weapons)}
        self.ri = {n: i for i, n in enumerate(w.rooms)}
        self.ti = {n: i for i, n in enumerate(w.times)}
        self.mi = {n: i for i, n in enumerate(w.motives)}
        near = [[self.ri[x] for x in [room, *w.adjacent(room)]] for room in w.rooms]

        def bools(name: str, *shape: int) -> Any:
            if len(shape) == 1:
                return [m.NewBoolVar(f"{name}{i}") for i in range(shape[0])]
            return [bools(f"{name}{i}_", *shape[1:]) for i in range(shape[0])]

        self.loc = bools("loc", len(S), len(T), len(R))
        self.wloc = bools("wloc", len(W), len(T), len(R))
        self.mot = bools("mot", len(S), len(M))
        self.who, self.what = bools("who", len(S)), bools("what", len(W))
        self.where, self.when = bools("where", len(R)), bools("when", len(T))
        self.why = bools("why", len(M))

        # Everyone and everything is in exactly one room, and moves at most one step.
        for grid in (self.loc, self.wloc):
            for x in grid:
                for t in T:
                    m.AddExactlyOne(x[t])
                    for r in R:
                        if t + 1 < len(T):
                            m.AddBoolOr([x[t][r].Not()] + [x[t + 1][q] for q in near[r]])
        # A weapon moves from r to q only if some suspect makes the same move.
        for t in range(len(T) - 1):
            for r in R:
                for q in near[r][1:]:
                    movers = []
                    for s in S:
                        mv = m.NewBoolVar("")
                        m.AddImplication(mv, self.loc[s][t][r])
                        m.AddImplication(mv, self.loc[s][t + 1][q])
                        movers.append(mv)
                    for x in W:
                        m.AddBoolOr([self.wloc[x][t][r].Not(), self.wloc[x][t + 1][q].Not(), *movers])  # fmt: skip
        # One motive each; every motive is held (a permutation when there are as many).
        for s in S:
            m.AddExactlyOne(self.mot[s])
        for k in M:
            holders = [self.mot[s][k] for s in S]
            if len(M) == len(S):
                m.AddExactlyOne(holders)
            else:
                m.AddBoolOr(holders)
        # The murder: the murderer and the weapon are in the room, no other suspect is.
        for v in (self.who, self.what, self.where, self.when):
            m.AddExactlyOne(v)
        for t in T:
            for r in R:
                tr = [self.when[t].Not(), self.where[r].Not()]
                for s in S:
                    m.AddBoolOr([*tr, self.who[s].Not(), self.loc[s][t][r]])
                    m.AddBoolOr([*tr, self.loc[s][t][r].Not(), self.who[s]])
                for x in W:
                    m.AddBoolOr([*tr, self.what[x].Not(), self.wloc[x][t][r]])
        for k in M:
            for s in S:
                m.AddBoolOr([self.who[s].Not(), self.mot[s][k].Not(), self.why[k]])
                m.AddBoolOr([self.who[s].Not(), self.mot[s][k], self.why[k].Not()])
        # The victim walks like a suspect until the murder, then stays in the murder room.
        self.vloc: list[list[Lit]] = []
        if w.victim_rooms:
            self.vloc = bools("vloc", len(T), len(R))
            for t in T:
                m.AddExactlyOne(self.vloc[t])
                for r in R:
                    if t + 1 < len(T):
                        m.AddBoolOr([self.vloc[t][r].Not()] + [self.vloc[t + 1][q] for q in near[r]])  # fmt: skip
                    for u in range(t + 1):
                        m.AddBoolOr([self.when[u].Not(), self.where[r].Not(), self.vloc[t][r]])
        # Facts stated up front.
        facts = {"who": (self.who, self.si[w.murderer]), "weapon": (self.what, self.wi[w.weapon]),
                 "room": (self.where, self.ri[w.room]), "time": (self.when, self.ti[w.time]),
                 "why": (self.why, self.mi[w.motive_of[w.murderer]])}  # fmt: skip
        for g in w.given:
            v, i = facts[g]
            m.AddBoolOr([v[i]])

        self._at_cache: dict[tuple, Lit] = {}
        self.differ: Lit | None = None

    # --- literals for statements ---------------------------------------------------------
    def at(self, s: Subject, t: int, r: int) -> Lit:
        """Literal: subject `s` is in room r at time t (fully reified for descriptions)."""
        kind = s["type"]
        if kind == "suspect":
            return self.loc[self.si[s["name"]]][t][r]
        if kind == "weapon":
            return self.wloc[self.wi[s["name"]]][t][r]
        if kind == "victim":
            return self.vloc[t][r]
        key = (kind, s.get("name"), t, r)
        if key not in self._at_cache:
            # z == OR_i (sel[i] and grid[i][t][r]), where exactly one sel[i] holds
            if kind == "murderer":
                sel, grid = self.who, self.loc
            elif kind == "murder_weapon":
                sel, grid = self.what, self.wloc
            else:
                sel, grid = [row[self.mi[s["name"]]] for row in self.mot], self.loc
            z = self.m.NewBoolVar("")
            if kind == "motive" and self.world.shared_motives:
                # several suspects may hold the motive: z == OR_i (sel[i] and grid[i]),
                # through one auxiliary per suspect (the shortcut below would force all
                # holders into the same room). Clues add the one-holder presupposition.
                both = []
                for i, chosen in enumerate(sel):
                    y = self.m.NewBoolVar("")
                    self.m.AddBoolAnd([chosen, grid[i][t][r]]).OnlyEnforceIf(y)
                    self.m.AddBoolOr([chosen.Not(), grid[i][t][r].Not(), y])
                    both.append(y)
                self.m.AddMaxEquality(z, both)
            else:
                for i, chosen in enumerate(sel):
                    self.m.AddBoolOr([chosen.Not(), grid[i][t][r].Not(), z])
                    self.m.AddBoolOr([chosen.Not(), grid[i][t][r], z.Not()])
            self._at_cache[key] = z
        return self._at_cache[key]

    def atom(self, a: Clue) -> Lit:
        if a["family"] == "at":
            return self.at(a["subject"], self.ti[a["time"]], self.ri[a["room"]])
        if a["family"] == "killed":
            what = a["what"]
            if what == "weapon":
                return self.what[self.wi[a["value"]]]
            return self.where[self.ri[a["value"]]] if what == "room" else self.when[self.ti[a["value"]]]  # fmt: skip
        return self.mot[self.si[a["suspect"]]][self.mi[a["motive"]]]

    def _presuppose(self, c: Clue, e: Lit) -> None:
        """With shared motives, "the suspect motivated by M" asserts M has one holder."""
        w = self.world
        if len(w.motives) == len(w.suspects):
            return
        for name in motive_subjects(c):
            self.m.AddAtMostOne([row[self.mi[name]] for row in self.mot]).OnlyEnforceIf(e)

    # --- clues ---------------------------------------------------------------------------
    def add_clue(self, c: Clue) -> Lit:
        """Add a clue's constraints, enforced only when the returned literal is true."""
        m, f, e = self.m, c["family"], self.m.NewBoolVar("")
        R = range(len(self.world.rooms))
        self._presuppose(c, e)
        if f in ("at", "motive"):
            m.AddImplication(e, self.atom(c))
        elif f == "killed":
            m.AddImplication(e, self.atom(c).Not() if c.get("negated") else self.atom(c))
        elif f == "same_motive":
            a, b = (self.mot[self.si[x]] for x in c["suspects"])
            for k in range(len(a)):
                if c["same"]:
                    m.AddImplication(a[k], b[k]).OnlyEnforceIf(e)
                    m.AddImplication(b[k], a[k]).OnlyEnforceIf(e)
                else:
                    m.AddBoolOr([a[k].Not(), b[k].Not()]).OnlyEnforceIf(e)
        elif f == "either":
            a, b = map(self.atom, c["atoms"])
            m.Add(a + b == 1).OnlyEnforceIf(e)
        elif f == "iff":
            a, b = map(self.atom, c["atoms"])
            m.Add(a == b).OnlyEnforceIf(e)
        elif f == "same_room":
            (s1, s2), t = c["subjects"], self.ti[c["time"]]
            for r in R:
                m.AddBoolOr([self.at(s1, t, r).Not(), self.at(s2, t, r)]).OnlyEnforceIf(e)
        elif f == "together":
            (s1, s2), r = c["subjects"], self.ri[c["room"]]
            both = []
            for t in range(len(self.world.times)):
                y = m.NewBoolVar("")
                m.AddImplication(y, self.at(s1, t, r))
                m.AddImplication(y, self.at(s2, t, r))
                both.append(y)
            m.AddBoolOr(both).OnlyEnforceIf(e)
        elif f in ("moved", "carried"):
            t0, t1 = self.ti[c["time"]], self.ti[c["next_time"]]
            a, b = self.ri[c["from"]], self.ri[c["to"]]
            movers = [c["subject"]] + ([c["weapon"]] if f == "carried" else [])
            m.AddBoolAnd([x for s in movers for x in (self.at(s, t0, a), self.at(s, t1, b))]).OnlyEnforceIf(e)  # fmt: skip
        elif f == "direction":
            (s1, s2), t = c["subjects"], self.ti[c["time"]]
            for room in self.world.rooms:
                n = self.world.neighbor(room, c["direction"])
                there = [self.at(s1, t, self.ri[n])] if n else []
                m.AddBoolOr([self.at(s2, t, self.ri[room]).Not(), *there]).OnlyEnforceIf(e)
        elif f == "murder_room":
            t = self.ti[c["time"]]
            for r in R:
                m.AddBoolOr([self.where[r].Not(), self.at(c["subject"], t, r)]).OnlyEnforceIf(e)
        elif f == "murder_time":
            t = self.ti[c["time"]]
            ruled_out = range(t, len(self.when)) if c["relation"] == "before" else range(t + 1)
            for u in ruled_out:
                m.AddImplication(e, self.when[u].Not())
        else:
            raise ValueError(f"unknown clue family {f!r}")
        return e

    # --- questions -----------------------------------------------------------------------
    def answer(self, q: dict[str, Any]) -> Lit:
        """Literal: question `q` has its key answer (see `prompt.py` for question kinds)."""
        kind, a = q["kind"], q["answer"]
        if kind == "who":
            return self.who[self.si[a]]
        if kind == "weapon":
            return self.what[self.wi[a]]
        if kind == "room":
            return self.where[self.ri[a]]
        if kind == "time":
            return self.when[self.ti[a]]
        if kind == "why":
            return self.why[self.mi[a]]
        if kind == "suspect_room":
            return self.loc[self.si[q["suspect"]]][self.ti[q["time"]]][self.ri[a]]
        if kind == "weapon_room":
            return self.wloc[self.wi[q["weapon"]]][self.ti[q["time"]]][self.ri[a]]
        if kind == "suspect_motive":
            return self.mot[self.si[q["suspect"]]][self.mi[a]]
        if kind == "motive_suspect":  # a is the one holder of the motive
            k, z = self.mi[q["motive"]], self.m.NewBoolVar("")
            only = [row[k] if i == self.si[a] else row[k].Not() for i, row in enumerate(self.mot)]
            self.m.AddBoolAnd(only).OnlyEnforceIf(z)
            self.m.AddBoolOr([x.Not() for x in only]).OnlyEnforceIf(z.Not())
            return z
        if kind == "victim_room":
            return self.vloc[self.ti[q["time"]]][self.ri[a]]
        raise ValueError(f"unknown question kind {kind!r}")

    def set_questions(self, questions: list[dict[str, Any]]) -> None:
        """Add the switch ``differ``: at least one asked answer is not the key's."""
        self.differ = self.m.NewBoolVar("differ")
        self.m.AddBoolOr([self.answer(q).Not() for q in questions]).OnlyEnforceIf(self.differ)

    # --- solving -------------------------------------------------------------------------
    def solve(self, assumptions: list[Lit]) -> tuple[bool, cp_model.CpSolver]:
        """Solve with the given literals assumed true; returns (feasible, solver)."""
        self.m.ClearAssumptions()
        self.m.AddAssumptions(assumptions)
        solver = solver_params(cp_model.CpSolver())
        status = solver.Solve(self.m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.INFEASIBLE):
            raise RuntimeError(f"CP-SAT returned {solver.StatusName(status)}")
        return status != cp_model.INFEASIBLE, solver

    def world_from(self, solver: cp_model.CpSolver) -> World:
        """The world in a solution (for example a counterexample to uniqueness)."""
        w = self.world

        def pick(names: list[str], row: list[Lit]) -> str:
            return next(n for n, v in zip(names, row, strict=True) if solver.BooleanValue(v))

        return World(
            w.suspects, w.weapons, w.rooms, w.rows, w.cols, w.times, w.motives,
            suspect_rooms={s: [pick(w.rooms, x) for x in self.loc[i]] for i, s in enumerate(w.suspects)},
            weapon_rooms={x: [pick(w.rooms, y) for y in self.wloc[i]] for i, x in enumerate(w.weapons)},
            motive_of={s: pick(w.motives, self.mot[i]) for i, s in enumerate(w.suspects)},
            murderer=pick(w.suspects, self.who), weapon=pick(w.weapons, self.what),
            room=pick(w.rooms, self.where), time=pick(w.times, self.when), given=list(w.given),
            cells=list(w.cells), victim_rooms=[pick(w.rooms, x) for x in self.vloc],
        )  # fmt: skip
