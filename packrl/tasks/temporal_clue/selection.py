"""Clue selection: a minimal clue set with unique answers that names every required entity.

Three steps, all on one `PuzzleModel` with switched clues (docs/temporal_clue.md, "How a
puzzle is made"):

1. Counterexample-guided growth (`Selector.grow`): while CP-SAT finds a world that fits the
   chosen clues but changes an asked answer, add a true clue that this world violates.
   Among those, clues naming a required entity that no chosen clue names yet are favoured
   (`NAME_BOOST`), so naming clues are picked because they are needed, not added later.
2. Deletion (`Selector.minimize`): try every clue for removal; clues that are the only
   namer of a required entity go last (recomputed as clues drop), so redundant clues go
   first and a naming clue is dropped only if it is redundant at the end; clues naming a
   room answer go first, so the answer room is not the most-named room by default.
3. Repair (`Selector.repair`): an entity still unnamed gets a swap. A kept clue ``e`` is
   replaced by a true clue ``c`` naming the entity that rules out every known world which
   shows ``e`` is needed; if the swapped set is unique, ``c`` is needed in it (without it the
   set is the old one minus ``e``). Then step 2 runs again.
4. Balance (`Selector.unname`): a room or time answer named at least as often as every
   other room (time) is a "most named" answer shortcut. The same kind of swap takes out a
   clue naming it for a true clue that does not name it (up to `BALANCE_SWAPS`); then step 2
   runs again. Where no swap is found the set is kept as it is (the file-level balance,
   `balance.py`, deals with what is left), so no world is dropped for it.

Every world CP-SAT returns is a counterexample: it satisfies the rules and changes an asked
answer. They are kept (`bank`): a deletion test whose remaining clues all hold in a banked
world has its answer (the clue is needed) without a solve. That is exact, because
`clues.holds` and the CP-SAT encoding agree on every family (tests/test_temporal_clue.py
checks it on banked worlds), and it saves most of the solves of repeated deletion passes.

Deterministic: every choice comes from the seeded `rng`, and solves use one worker.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from packrl.tasks.temporal_clue.clues import Clue, clue_mix, holds, names_in, sample_clue
from packrl.tasks.temporal_clue.config import PuzzleConfig
from packrl.tasks.temporal_clue.model import PuzzleModel
from packrl.tasks.temporal_clue.prompt import Question, giveaway
from packrl.tasks.temporal_clue.scenario import World

POOL_SIZE = 60  # candidate clues drawn at a time
MAX_CLUES = 150  # give up on a world (and draw another) past this many clues
NAMING_ROUNDS = 10  # deletion + repair rounds to get every required entity named
REPAIR_DRAWS = 1500  # clue draws per entity when looking for a naming replacement
REPAIR_TRIES = 8  # failed swaps (one solve each) per unnamed entity before a new world
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
# Question kinds answered by a room. Deletion tries clues naming these answers first (the
# max picks the first of equals, so the order is random otherwise): a minimal set keeps a
# clue naming the answer room only where it is needed. Without it the answer room was the
# most-named room 31% of the time on room and suspect_room questions (chance 15-16%,
# 120 puzzles of levels 3-6), since the clues that settle a location tend to name it; with
# it suspect_room is at chance, the murder room still not (docs/temporal_clue.md, step 7).
ROOM_KINDS = ("room", "suspect_room", "weapon_room", "victim_room")
# ... and one naming j required entities that the chosen clues do not name yet, with
# weight NAME_BOOST**j (step 1 above).
NAME_BOOST = 4.0
# Answers that must not be named by more clues than every other entity of their kind (step
# 4, `Selector.unname`): the world's list of candidates -> the question kinds it answers.
# The murder room and time are named more than other rooms and times for two measured
# reasons: a true clue drawn at random (12 fresh level 7 and 9 worlds) names the murder room
# 1.2 to 2.5 times as often as an average room (the body stays there, the murderer and weapon
# converge on it, "killed in" atoms name it) and the murder time 1.1 to 1.3 times; and the
# clues that settle where the murder was tend to state it. Weights in growth and an order in
# deletion only lean against that; at 16 rooms the murder room was still the most-named room
# in 43% of the level 7-9 puzzles (chance 7.5%). A check on the final set does not lean, it
# measures. Suspect, weapon and motive answers are left out: must_name names all of them,
# and their answers are not over-named (puzzles/README.md).
COUNTED_KINDS = {"rooms": ROOM_KINDS, "times": ("time",)}
BALANCE_SWAPS = 6  # swaps per world that take a clue naming an over-named answer out
BALANCE_TRIES = 3  # one-for-one balance swaps tried (one solve each) before regrowing
AVOID_WEIGHT = 0.1  # growth weight per over-named answer a clue names, while step 4 regrows


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


def named(clues: list[Clue]) -> set[str]:
    """Every entity name the clues mention."""
    return set().union(*(names_in(c) for c in clues)) if clues else set()


class Selector:
    """The state of one world's clue selection: model, candidate pool, counterexamples.

    `stats` counts solves (CP-SAT calls), deletion tests answered from the bank
    (``bank_hits``), naming repairs that succeeded (``repairs``), balance swaps that
    succeeded (``balance_swaps``) and rounds.
    """

    def __init__(self, w: World, questions: list[Question], cfg: PuzzleConfig, rng: random.Random):  # fmt: skip
        self.world, self.questions, self.rng = w, questions, rng
        self.model = PuzzleModel(w)
        self.model.set_questions(questions)
        self.mix = clue_mix(cfg)
        self.seen: set[str] = set()  # texts of clues drawn into the pool
        self.pool = self._draw(POOL_SIZE)
        self.required = must_name(w, questions)
        self.answers = {q["answer"] for q in questions if q["kind"] != "time"}
        self.room_answers = {q["answer"] for q in questions if q["kind"] in ROOM_KINDS}
        # per counted kind: (its asked answers, all its entities); kinds nobody asks are left out
        lists = {"rooms": [r for r in w.rooms if r is not None], "times": list(w.times)}
        self.counted = [
            (answers, lists[kind])
            for kind, kinds in COUNTED_KINDS.items()
            if (answers := {q["answer"] for q in questions if q["kind"] in kinds})
        ]  # fmt: skip
        self.avoid: set[str] = set()  # names growth draws rarely (AVOID_WEIGHT), in step 4
        self.lit: dict[int, tuple[Clue, Any]] = {}  # id(clue) -> (clue, enforcement literal)
        self.bank: list[World] = []
        self._false: list[set[int]] = []  # per banked world: ids of clues false in it
        self._checked: list[set[int]] = []  # per banked world: ids of clues evaluated
        self._alive: dict[int, Clue] = {}  # every clue whose id is a cache key
        self.stats = {"solves": 0, "bank_hits": 0, "repairs": 0, "balance_swaps": 0, "naming_rounds": 0}  # fmt: skip

    # --- candidates ------------------------------------------------------------------
    def _draw(self, n: int) -> list[tuple[str, Clue]]:
        """`n` fresh true clues as (sampler, clue), none stating an asked answer outright."""
        names, weights = list(self.mix), list(self.mix.values())
        out = []
        for sampler in self.rng.choices(names, weights=weights, k=n):
            c = sample_clue(self.rng, self.world, sampler)
            if c is None or c["text"] in self.seen or giveaway(c, self.questions):
                continue
            self.seen.add(c["text"])
            out.append((sampler, c))
        return out

    def _candidates(self, accept: Callable[[set[str]], bool], avoid: set[str]) -> list[Clue]:
        """Distinct true clues from `REPAIR_DRAWS` draws of the mix whose names (`names_in`)
        `accept` takes; texts in `avoid` and giveaways left out."""
        names, weights = list(self.mix), list(self.mix.values())
        out, texts = [], set(avoid)
        for sampler in self.rng.choices(names, weights=weights, k=REPAIR_DRAWS):
            c = sample_clue(self.rng, self.world, sampler)
            if c is None or not accept(names_in(c)) or c["text"] in texts:
                continue
            if giveaway(c, self.questions):
                continue
            texts.add(c["text"])
            out.append(c)
        return out

    # --- solving ---------------------------------------------------------------------
    def _literal(self, c: Clue) -> Any:
        if id(c) not in self.lit:
            self.lit[id(c)] = (c, self.model.add_clue(c))
        return self.lit[id(c)][1]

    def _solve(self, clues: list[Clue]) -> tuple[World | None, set[int]]:
        """(a counterexample world, set()) or (None, ids of a sufficient core of `clues`)."""
        feasible, solver = self.model.solve([self._literal(c) for c in clues] + [self.model.differ])  # fmt: skip
        self.stats["solves"] += 1
        if feasible:
            cw = self.model.world_from(solver)
            self.bank.append(cw)
            self._false.append(set())
            self._checked.append(set())
            return cw, set()
        core = set(solver.SufficientAssumptionsForInfeasibility())
        return None, {id(c) for c in clues if self.lit[id(c)][1].Index() in core}

    def _is_false(self, i: int, c: Clue) -> bool:
        """Whether clue `c` is false in banked world `i` (cached by the clue's id)."""
        self._alive.setdefault(id(c), c)  # an id must not be reused while it is cached
        if id(c) not in self._checked[i]:
            self._checked[i].add(id(c))
            if not holds(c, self.bank[i]):
                self._false[i].add(id(c))
        return id(c) in self._false[i]

    def _witnesses(self, clues: list[Clue]) -> list[int]:
        """Banked worlds in which every clue holds: each shows the clues leave answers open."""
        return [i for i in range(len(self.bank)) if not any(self._is_false(i, c) for c in clues)]

    def _witnessed(self, clues: list[Clue]) -> bool:
        return any(not any(self._is_false(i, c) for c in clues) for i in range(len(self.bank)))

    # --- step 1 ----------------------------------------------------------------------
    def grow(self, chosen: list[Clue]) -> list[Clue] | None:
        """Add clues until the answers are unique; None if this world gets stuck."""
        chosen = list(chosen)
        while True:
            cw, _ = self._solve(chosen)
            if cw is None:
                return chosen
            for _ in range(5):
                killers = [(s, c) for s, c in self.pool if not holds(c, cw)]
                if killers:
                    break
                self.pool += self._draw(POOL_SIZE)
            else:
                return None  # no clue family tells this counterexample apart
            samplers = sorted({s for s, _ in killers})
            sampler = self.rng.choices(samplers, weights=[self.mix[s] for s in samplers])[0]
            same = [x for x in killers if x[0] == sampler]
            unnamed = self.required - named(chosen)
            weights = [
                ANSWER_NAME_WEIGHT ** len(names_in(c) & self.answers)
                * NAME_BOOST ** len(names_in(c) & unnamed)
                * AVOID_WEIGHT ** len(names_in(c) & self.avoid)
                for _, c in same
            ]  # fmt: skip
            pick = self.rng.choices(same, weights=weights)[0]
            self.pool.remove(pick)
            chosen.append(pick[1])
            if len(chosen) > MAX_CLUES:
                return None

    # --- step 2 ----------------------------------------------------------------------
    def _sole_namers(self, clues: list[Clue]) -> set[int]:
        """Ids of clues that are the only one among `clues` naming some required entity."""
        by_name: dict[str, list[int]] = {}
        for c in clues:
            for n in names_in(c) & self.required:
                by_name.setdefault(n, []).append(id(c))
        return {ids[0] for ids in by_name.values() if len(ids) == 1}

    def minimize(self, chosen: list[Clue]) -> list[Clue]:
        """A subset of the unique set `chosen` in which no clue can be dropped.

        Each clue is tried once, in random order except that clues naming more room
        answers go first (`ROOM_KINDS`) and the current sole namers of required entities
        go last. After a removal, the set shrinks to the solver's core,
        except that untried clues naming an entity the core leaves unnamed stay for their
        own test (they may become needed once other clues have gone).
        """
        order = list(chosen)
        self.rng.shuffle(order)
        kept, tried = list(chosen), set()
        while True:
            live = {id(c) for c in kept}
            untried = [c for c in order if id(c) in live and id(c) not in tried]
            if not untried:
                return kept
            sole = self._sole_namers(kept)
            free = [c for c in untried if id(c) not in sole] or untried
            clue = max(free, key=lambda c: len(names_in(c) & self.room_answers))
            tried.add(id(clue))
            rest = [c for c in kept if c is not clue]
            if self._witnessed(rest):
                self.stats["bank_hits"] += 1
                continue
            cw, core = self._solve(rest)
            if cw is not None:
                continue
            left = self.required - named([c for c in rest if id(c) in core])
            kept = [
                c for c in rest
                if id(c) in core or (id(c) not in tried and names_in(c) & left)
            ]  # fmt: skip

    # --- step 3 ----------------------------------------------------------------------
    def repair(self, kept: list[Clue], name: str) -> list[Clue] | None:
        """`kept` (unique) with one clue swapped for one naming `name`, or None if stuck.

        A swap takes out a clue ``e`` that is not the only namer of a required entity and
        puts in a true clue ``c`` naming `name` that is false in every banked world showing
        ``e`` is needed. Among those, ``c`` is the one that keeps the most other clues
        needed, i.e. that holds in a banked world showing each of them is needed (the only
        namers first), so the next deletion pass keeps them, mostly without a solve. If
        CP-SAT finds the swapped set not unique, its counterexample joins the bank and the
        next best swap is tried; after `REPAIR_TRIES` the first one is grown back to unique
        answers (step 1).
        """
        sole = self._sole_namers(kept)
        outs = [e for e in kept if id(e) not in sole]
        candidates = self._candidates(lambda ns: name in ns, {c["text"] for c in kept})
        swapped, fallback = self._swap(kept, outs, candidates, REPAIR_TRIES)
        if swapped is not None:
            self.stats["repairs"] += 1
            return swapped
        return None if fallback is None else self.grow(fallback)

    def _swap(self, kept: list[Clue], outs: list[Clue], candidates: list[Clue], tries: int,
              rank: Callable[[Clue, Clue], tuple | None] | None = None) -> tuple[list[Clue] | None, list[Clue] | None]:  # fmt: skip
        """One clue of `outs` (a subset of the unique set `kept`) swapped for one of
        `candidates`: (the unique swapped set or None, the first swap tried or None).

        A swap (e out, c in) is possible when c is false in every banked world showing e is
        needed; possible swaps are ranked by ``rank(e, c)`` (None: skip it) if given, then by
        how many clues c keeps needed (holds in a banked world showing each is needed; the
        only namers first). The best is solved; if CP-SAT finds it not unique, its
        counterexample is banked (which rules it out) and the next best tried, `tries` times.
        """
        sole = self._sole_namers(kept)
        fallback = None
        for _ in range(tries):
            shown = {id(f): self._witnesses([c for c in kept if c is not f]) for f in kept}
            best, best_key = None, None
            for e in outs:
                for c in candidates:
                    if any(not self._is_false(i, c) for i in shown[id(e)]):
                        continue  # some known world still shows e's information is missing
                    first = () if rank is None else rank(e, c)
                    if first is None:
                        continue
                    keeps = [f for f in kept if f is not e and any(not self._is_false(i, c) for i in shown[id(f)])]  # fmt: skip
                    key = (*first, sum(id(f) in sole for f in keeps), len(keeps))
                    if best_key is None or key > best_key:
                        best, best_key = (e, c), key
            if best is None:
                break
            e, c = best
            swapped = [*(f for f in kept if f is not e), c]
            if self._solve(swapped)[0] is None:
                return swapped, fallback
            fallback = fallback or swapped
        return None, fallback

    # --- step 4 ----------------------------------------------------------------------
    def overnamed(self, clues: list[Clue]) -> dict[str, int]:
        """Answer of a counted kind (`COUNTED_KINDS`) -> by how much it is the most named.

        An answer named by ``k > 0`` of `clues`, where the most-named entity of its kind
        that is no answer is named by ``top <= k``, maps to ``k - top + 1``: how many of its
        namings have to go (or other entities' namings come) before "most named" misses it.
        Empty when no answer is the most named.
        """
        return self._overnamed(Counter(n for c in clues for n in names_in(c)))

    def _overnamed(self, counts: Counter[str], plus: set[str] = frozenset()) -> dict[str, int]:  # type: ignore[assignment]
        """`overnamed` from name counts, each name in `plus` counted once more."""
        out = {}
        for answers, entities in self.counted:
            top = max((counts[x] + (x in plus) for x in entities if x not in answers), default=0)
            for a in answers:
                k = counts[a] + (a in plus)
                if k and k >= top:
                    out[a] = k - top + 1
        return out

    def unname(self, kept: list[Clue]) -> list[Clue] | None:
        """`kept` (unique, every required entity named) with one clue naming an over-named
        answer (`overnamed`) swapped for a true clue naming none, or None if none is found.

        The swap is `repair`'s: ``e`` (not the only namer of a required entity) goes, ``c``
        comes, false in every banked world showing ``e`` is needed. Among those, the swap
        that leaves the least over-naming wins, then `repair`'s key. A swap that CP-SAT finds
        not unique banks its counterexample and the next is tried, `BALANCE_TRIES` times; then
        the first one is grown back to unique answers (step 1), avoiding the over-named.
        """
        over = self.overnamed(kept)
        sole = self._sole_namers(kept)
        outs = [e for e in kept if names_in(e) & over.keys() and id(e) not in sole]
        candidates = self._candidates(lambda ns: not ns & over.keys(), {c["text"] for c in kept})
        names = {id(c): names_in(c) for c in candidates}
        before = sum(over.values())
        counts = {id(e): Counter(n for f in kept if f is not e for n in names_in(f)) for e in outs}

        def rank(e: Clue, c: Clue) -> tuple[int] | None:
            """Minus the over-naming left after the swap; None if it does not drop."""
            left = sum(self._overnamed(counts[id(e)], names[id(c)]).values())
            return None if left >= before else (-left,)

        swapped, fallback = self._swap(kept, outs, candidates, BALANCE_TRIES, rank)
        if swapped is not None:
            self.stats["balance_swaps"] += 1
            return swapped
        if fallback is None:
            return None
        # No one clue replaces e: grow the first swap back to unique answers, drawing clues
        # that name the over-named answers rarely (`AVOID_WEIGHT`); deletion then decides.
        self.avoid = set(over)
        grown = self.grow(fallback)
        self.avoid = set()
        if grown is not None:
            self.stats["balance_swaps"] += 1
        return grown

    def select(self) -> list[Clue] | None:
        """The clue set, or None if this world gets stuck (then draw another world).

        Rounds of deletion (step 2), then naming repairs (step 3) while a required entity is
        unnamed, else a balance swap (step 4) while an answer is over-named. A set that names
        everything is returned even if no balance swap is found or they run out.
        """
        chosen = self.grow([])
        if chosen is None:
            return None
        done: list[Clue] | None = None  # the last minimal set naming every required entity
        for rounds in range(1, NAMING_ROUNDS + 1):
            self.stats["naming_rounds"] = rounds
            kept = self.minimize(chosen)
            missing = sorted(self.required - named(kept))
            if not missing:
                done = kept
                if not self.overnamed(kept) or self.stats["balance_swaps"] >= BALANCE_SWAPS:
                    return kept
                swapped = self.unname(kept)
                if swapped is None:
                    return kept
                chosen = swapped
                continue
            chosen = kept
            for name in missing:
                if name in named(chosen):
                    continue
                swapped = self.repair(chosen, name)
                if swapped is None:
                    return done
                chosen = swapped
        return done


def select_clues(w: World, questions: list[Question], cfg: PuzzleConfig,
                 rng: random.Random) -> tuple[list[Clue] | None, dict[str, int]]:  # fmt: skip
    """A minimal clue set under which the asked answers are unique and every entity in
    `must_name` is named by some clue, shuffled (None if this world gets stuck), and the
    selection's stats (`Selector.stats` plus ``candidates``, the clues drawn)."""
    sel = Selector(w, questions, cfg, rng)
    clues = sel.select()
    if clues is not None:
        rng.shuffle(clues)
    return clues, {**sel.stats, "candidates": len(sel.seen)}
