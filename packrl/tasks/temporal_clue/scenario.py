"""The hidden world of a Temporal Clue puzzle: a mansion on a grid, suspects, weapons, times.

Suspects walk between rooms that share a wall (north/south/east/west) or stay put; a weapon
moves only when a suspect carries it, making the same move. The murderer is alone with the
victim in the murder room at the murder time, and the murder weapon is there too. Every
suspect has a different motive. Everything is drawn from a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

VICTIM = "Mr. Boddy"
SUSPECT_NAMES = [
    "Miss Scarlett", "Colonel Mustard", "Mrs. White", "Mr. Green", "Mrs. Peacock",
    "Professor Plum", "Lady Ashford", "Dr. Orchid", "Sergeant Gray", "Madame Rose",
]  # fmt: skip
WEAPON_NAMES = [
    "Candlestick", "Knife", "Lead Pipe", "Revolver", "Rope", "Wrench", "Poison",
    "Horseshoe", "Axe", "Trophy",
]  # fmt: skip
ROOM_NAMES = [
    "Kitchen", "Ballroom", "Conservatory", "Dining Room", "Billiard Room", "Library",
    "Lounge", "Hall", "Study", "Cellar", "Gallery", "Observatory",
]  # fmt: skip
MOTIVE_NAMES = [
    "Revenge", "Jealousy", "Greed", "Blackmail", "Ambition", "Fear", "Betrayal",
    "Inheritance",
]  # fmt: skip
DIRECTIONS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}


@dataclass(frozen=True)
class Sizes:
    """Scenario size and question mix for one difficulty ("number of players", 1-6)."""

    suspects: int
    weapons: int
    rows: int
    cols: int
    times: int
    given: tuple[str, ...]  # main facts stated up front, so not asked ("time", "room")
    bonus: int  # extra "where was X at T" / "what was X's motive" questions


SIZES: dict[int, Sizes] = {
    1: Sizes(suspects=3, weapons=3, rows=2, cols=2, times=3, given=("time", "room"), bonus=0),
    2: Sizes(suspects=3, weapons=3, rows=2, cols=2, times=4, given=("time",), bonus=1),
    3: Sizes(suspects=4, weapons=4, rows=2, cols=3, times=4, given=(), bonus=1),
    4: Sizes(suspects=5, weapons=4, rows=2, cols=3, times=5, given=(), bonus=2),
    5: Sizes(suspects=5, weapons=5, rows=3, cols=3, times=5, given=(), bonus=2),
    6: Sizes(suspects=6, weapons=6, rows=3, cols=3, times=6, given=(), bonus=3),
}


def sizes_for(players: int) -> Sizes:
    if players not in SIZES:
        raise ValueError(f"players (difficulty) must be one of {sorted(SIZES)}, got {players!r}")
    return SIZES[players]


def time_label(minutes: int) -> str:
    """Minutes after midnight (may exceed a day) -> '11:45 PM'."""
    h, m = divmod(minutes % (24 * 60), 60)
    return f"{(h - 1) % 12 + 1}:{m:02d} {'AM' if h < 12 else 'PM'}"


@dataclass
class World:
    """One full hidden world. Rooms are listed row-major; row 0 is the northernmost row.

    ``suspect_rooms[s][t]`` / ``weapon_rooms[w][t]`` name the room at the t-th time.
    """

    suspects: list[str]
    weapons: list[str]
    rooms: list[str]
    rows: int
    cols: int
    times: list[str]
    motives: list[str]
    suspect_rooms: dict[str, list[str]]
    weapon_rooms: dict[str, list[str]]
    motive_of: dict[str, str]
    murderer: str
    weapon: str
    room: str
    time: str
    given: list[str] = field(default_factory=list)

    # --- geometry -------------------------------------------------------------------
    def neighbor(self, room: str, direction: str) -> str | None:
        """The room directly `direction` of `room`, or None at the edge of the grid."""
        i = self.rooms.index(room)
        r, c = divmod(i, self.cols)
        dr, dc = DIRECTIONS[direction]
        r, c = r + dr, c + dc
        if 0 <= r < self.rows and 0 <= c < self.cols:
            return self.rooms[r * self.cols + c]
        return None

    def adjacent(self, room: str) -> list[str]:
        return [n for d in DIRECTIONS if (n := self.neighbor(room, d)) is not None]

    # --- subjects -------------------------------------------------------------------
    def suspect_with_motive(self, motive: str) -> str:
        return next(s for s, m in self.motive_of.items() if m == motive)

    def room_of(self, subject: dict[str, str], time: str) -> str:
        """Where a subject (see `clues.py`) was at `time`."""
        t = self.times.index(time)
        kind = subject["type"]
        if kind == "suspect":
            return self.suspect_rooms[subject["name"]][t]
        if kind == "weapon":
            return self.weapon_rooms[subject["name"]][t]
        if kind == "murderer":
            return self.suspect_rooms[self.murderer][t]
        if kind == "murder_weapon":
            return self.weapon_rooms[self.weapon][t]
        if kind == "motive":
            return self.suspect_rooms[self.suspect_with_motive(subject["name"])][t]
        raise ValueError(f"unknown subject type {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> World:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def random_world(rng: random.Random, players: int, max_tries: int = 1000) -> World:
    """Draw a world of the given difficulty: random walks, carried weapons, one murder."""
    sz = sizes_for(players)
    suspects = rng.sample(SUSPECT_NAMES, sz.suspects)
    weapons = rng.sample(WEAPON_NAMES, sz.weapons)
    rooms = rng.sample(ROOM_NAMES, sz.rows * sz.cols)
    motives = rng.sample(MOTIVE_NAMES, sz.suspects)
    start = rng.choice(range(20 * 60, 23 * 60 + 1, 15))
    step = rng.choice([15, 30, 60])
    times = [time_label(start + i * step) for i in range(sz.times)]
    world = World(
        suspects, weapons, rooms, sz.rows, sz.cols, times, motives, {}, {}, {}, "", "", "", ""
    )
    world.motive_of = dict(zip(suspects, rng.sample(motives, len(motives)), strict=True))
    world.given = list(sz.given)

    for _ in range(max_tries):
        walks = {s: [rng.choice(rooms)] for s in suspects}
        for _t in range(1, sz.times):
            for s in suspects:
                here = walks[s][-1]
                walks[s].append(here if rng.random() < 0.35 else rng.choice(world.adjacent(here)))
        carried = {w: [rng.choice(rooms)] for w in weapons}
        for t in range(1, sz.times):
            for w in weapons:
                here = carried[w][-1]
                movers = [s for s in suspects if walks[s][t - 1] == here and walks[s][t] != here]
                if movers and rng.random() < 0.5:
                    carried[w].append(walks[rng.choice(movers)][t])
                else:
                    carried[w].append(here)
        # (time, suspect, weapon) where the suspect is alone with the weapon
        options = []
        for t in range(sz.times):
            for s in suspects:
                room = walks[s][t]
                if sum(walks[o][t] == room for o in suspects) == 1:
                    options += [(t, s, w) for w in weapons if carried[w][t] == room]
        if options:
            t, s, w = rng.choice(options)
            world.suspect_rooms, world.weapon_rooms = walks, carried
            world.murderer, world.weapon, world.room, world.time = s, w, walks[s][t], times[t]
            return world
    raise RuntimeError(f"no murder possible after {max_tries} random walks")
