"""Puzzle knobs: scenario sizes, map shape, clue mix, questions; presets and their checks.

A `PuzzleConfig` fixes everything about a puzzle except the seed. `preset(level)` gives the
named difficulty levels ("number of players"): 1-6 are the original sizes, 7-10 reach and
pass the largest public Temporal Clue puzzles (10 suspects, 8 weapons, 16 rooms, 11 times).
`make_config(level, **knobs)` starts from a preset and overrides any knob; `check()` raises
`ValueError` naming the first inconsistent knob and how to fix it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

MAIN_FACTS = ("who", "weapon", "room", "time", "why")
BONUS_KINDS = ("suspect_room", "weapon_room", "suspect_motive", "motive_suspect", "victim_room")
MAPS = ("rect", "irregular")
MAX_TIMES = 16  # times are 15-60 minutes apart and must not wrap around a day


@dataclass(frozen=True)
class PuzzleConfig:
    """Every knob of a puzzle.

    suspects, weapons, rooms, times, motives: how many of each. ``motives < suspects`` means
        some suspects share a motive (every listed motive belongs to at least one suspect).
    rows, cols: the grid the rooms lie on; ``map="rect"`` fills it (rooms == rows * cols),
        ``map="irregular"`` leaves ``rows * cols - rooms`` cells without a room.
    victim_moves: Mr. Boddy walks like a suspect until the murder (then stays in the murder
        room), and clues may describe his movements.
    clue_weights: relative weight per clue family (see `clues.FAMILIES`); a family with
        weight 0 or missing is never used. None: the level's default mix.
    bonus: number of bonus questions; bonus_kinds: which kinds they are drawn from.
    given: main facts stated up front and so not asked (subset of `MAIN_FACTS`).
    level: the difficulty this config was made from (only steers the default clue mix).
    """

    suspects: int
    weapons: int
    rooms: int
    rows: int
    cols: int
    times: int
    motives: int
    map: str = "rect"
    victim_moves: bool = False
    clue_weights: dict[str, float] | None = None
    bonus: int = 0
    bonus_kinds: tuple[str, ...] = ("suspect_room", "weapon_room", "suspect_motive")
    given: tuple[str, ...] = ()
    level: int = 6

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bonus_kinds"], d["given"] = list(self.bonus_kinds), list(self.given)
        return d

    def check(self) -> PuzzleConfig:
        """Raise ValueError naming the first inconsistent knob; return self when all fit."""
        from packrl.tasks.temporal_clue.clues import FAMILIES
        from packrl.tasks.temporal_clue.scenario import NAME_COUNTS

        def need(ok: bool, knob: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"temporal clue knob {knob!r}: {msg}")

        for knob in ("suspects", "weapons", "rooms", "times", "motives", "rows", "cols", "bonus"):
            v = getattr(self, knob)
            need(isinstance(v, int) and not isinstance(v, bool), knob, f"must be an integer, got {v!r}")  # fmt: skip
        for knob, lo in (("suspects", 2), ("weapons", 2), ("rooms", 2), ("times", 2), ("motives", 1)):  # fmt: skip
            v, hi = getattr(self, knob), NAME_COUNTS.get(knob, MAX_TIMES)
            need(lo <= v <= hi, knob, f"must be in {lo}..{hi} (the names available), got {v}")
        need(self.rows >= 1 and self.cols >= 1, "rows", f"rows and cols must be >= 1, got {self.rows}x{self.cols}")  # fmt: skip
        need(self.map in MAPS, "map", f"must be one of {MAPS}, got {self.map!r}")
        cells = self.rows * self.cols
        if self.map == "rect":
            need(self.rooms == cells, "rooms",
                 f"a rectangular {self.rows}x{self.cols} map holds exactly {cells} rooms, got "
                 f"{self.rooms}; change rows/cols or use map='irregular' for a map with gaps")  # fmt: skip
        else:
            need(self.rooms < cells, "rooms",
                 f"an irregular {self.rows}x{self.cols} map holds fewer than {cells} rooms, "
                 f"got {self.rooms}; enlarge rows/cols or use map='rect'")  # fmt: skip
        need(self.motives <= self.suspects, "motives",
             f"each motive belongs to at least one suspect, so motives <= suspects "
             f"({self.suspects}), got {self.motives}")  # fmt: skip
        bad = [g for g in self.given if g not in MAIN_FACTS]
        need(not bad, "given", f"unknown facts {bad}; choose from {MAIN_FACTS}")
        bad = [k for k in self.bonus_kinds if k not in BONUS_KINDS]
        need(not bad, "bonus_kinds", f"unknown question kinds {bad}; choose from {BONUS_KINDS}")
        need(bool(self.bonus_kinds) or self.bonus == 0, "bonus_kinds", "is empty but bonus > 0")
        need(
            "victim_room" not in self.bonus_kinds or self.victim_moves, "bonus_kinds",
            "'victim_room' questions need victim_moves=True (otherwise the victim has no track)",
        )  # fmt: skip
        need(self.bonus >= 0, "bonus", f"must be >= 0, got {self.bonus}")
        most = self.suspects * self.times + self.weapons * self.times
        need(self.bonus <= min(most, 12), "bonus", f"must be <= {min(most, 12)} here, got {self.bonus}")  # fmt: skip
        need(
            len(set(MAIN_FACTS) - set(self.given)) + self.bonus > 0, "given",
            "every main fact is given and there are no bonus questions: nothing to ask",
        )  # fmt: skip
        if self.clue_weights is not None:
            w = self.clue_weights
            need(isinstance(w, dict), "clue_weights", f"must be a dict family -> weight, got {w!r}")
            bad = [k for k in w if k not in FAMILIES]
            need(not bad, "clue_weights", f"unknown families {bad}; choose from {sorted(FAMILIES)}")
            neg = [k for k, v in w.items() if not isinstance(v, (int, float)) or v < 0]
            need(not neg, "clue_weights", f"weights must be numbers >= 0, bad: {neg}")
            need(any(v > 0 for v in w.values()), "clue_weights", "at least one family needs weight > 0")  # fmt: skip
            victim = [k for k in ("victim_at", "victim_moved") if w.get(k, 0) > 0]
            need(not victim or self.victim_moves, "clue_weights",
                 f"{victim} describe the victim's movements: set victim_moves=True")  # fmt: skip
        return self


def _p(level: int, s: int, w: int, rows: int, cols: int, t: int, bonus: int, **kw: Any) -> PuzzleConfig:  # fmt: skip
    rooms = kw.pop("rooms", rows * cols)
    return PuzzleConfig(suspects=s, weapons=w, rooms=rooms, rows=rows, cols=cols, times=t,
                        motives=kw.pop("motives", s), bonus=bonus, level=level, **kw)  # fmt: skip


# Levels 1-6 keep their original sizes and meaning; 7-10 add victim movements, shared motives,
# motive questions and gaps in the map. Level 9 is the public maximum, 10 passes it.
PRESETS: dict[int, PuzzleConfig] = {
    1: _p(1, 3, 3, 2, 2, 3, 0, given=("time", "room")),
    2: _p(2, 3, 3, 2, 2, 4, 1, given=("time",)),
    3: _p(3, 4, 4, 2, 3, 4, 1),
    4: _p(4, 5, 4, 2, 3, 5, 2),
    5: _p(5, 5, 5, 3, 3, 5, 2),
    6: _p(6, 6, 6, 3, 3, 6, 3),
    7: _p(7, 7, 6, 3, 4, 7, 3, rooms=11, map="irregular", motives=6, victim_moves=True,
          bonus_kinds=BONUS_KINDS),
    8: _p(8, 8, 7, 4, 4, 9, 4, rooms=14, map="irregular", motives=6, victim_moves=True,
          bonus_kinds=BONUS_KINDS),
    9: _p(9, 10, 8, 4, 4, 11, 4, motives=8, victim_moves=True, bonus_kinds=BONUS_KINDS),
    10: _p(10, 12, 10, 4, 5, 12, 5, motives=9, victim_moves=True, bonus_kinds=BONUS_KINDS),
}  # fmt: skip


def preset(level: int) -> PuzzleConfig:
    """The preset for a difficulty level (see `PRESETS`)."""
    if level not in PRESETS:
        raise ValueError(f"players (difficulty level) must be one of {sorted(PRESETS)}, got {level!r}")  # fmt: skip
    return PRESETS[level]


def make_config(level: int = 6, **knobs: Any) -> PuzzleConfig:
    """A preset with some knobs overridden, checked. Unknown knob names are an error.

    If `rooms` is overridden but not `rows`/`cols`, the smallest near-square grid that holds
    them is used (irregular when the rooms do not fill it).
    """
    base = preset(level)
    known = set(base.to_dict())
    bad = sorted(set(knobs) - known)
    if bad:
        raise ValueError(f"unknown temporal clue knob(s) {bad}; known knobs: {sorted(known)}")
    if "given" in knobs:
        knobs["given"] = tuple(knobs["given"])
    if "bonus_kinds" in knobs:
        knobs["bonus_kinds"] = tuple(knobs["bonus_kinds"])
    if "rooms" in knobs and "rows" not in knobs and "cols" not in knobs:
        n = knobs["rooms"]
        if isinstance(n, int) and n >= 1:
            rows = max(1, int(n**0.5))
            cols = -(-n // rows)
            knobs.setdefault("map", "rect" if rows * cols == n else "irregular")
            knobs["rows"], knobs["cols"] = rows, cols
    return replace(base, **knobs).check()
