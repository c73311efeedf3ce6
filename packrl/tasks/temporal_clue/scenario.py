"""The hidden world of a Temporal Clue puzzle: a mansion on a grid, suspects, weapons, times.

Suspects walk between rooms that share a wall (north/south/east/west) or stay put; a weapon
moves only when a suspect carries it, making the same move. The murderer is alone with the
victim in the murder room at the murder time, and the murder weapon is there too. Each
suspect has one motive (all different, or shared when there are fewer motives than
suspects). The map may have gaps, and the victim may walk until the murder (see
`config.PuzzleConfig`). Everything is drawn from a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from packrl.tasks.temporal_clue.config import PRESETS, PuzzleConfig, preset

VICTIM = "Mr. Boddy"
SUSPECT_NAMES = [
    "Miss Scarlett", "Colonel Mustard", "Mrs. White", "Mr. Green", "Mrs. Peacock",
    "Professor Plum", "Lady Ashford", "Dr. Orchid", "Sergeant Gray", "Madame Rose",
    "Captain Brown", "Miss Peach", "Reverend Olive", "Monsieur Brunette",
]  # fmt: skip
WEAPON_NAMES = [
    "Candlestick", "Knife", "Lead Pipe", "Revolver", "Rope", "Wrench", "Poison",
    "Horseshoe", "Axe", "Trophy", "Dumbbell", "Garden Shears",
]  # fmt: skip
ROOM_NAMES = [
    "Kitchen", "Ballroom", "Conservatory", "Dining Room", "Billiard Room", "Library",
    "Lounge", "Hall", "Study", "Cellar", "Gallery", "Observatory", "Chapel", "Armory",
    "Greenhouse", "Music Room", "Nursery", "Pantry", "Trophy Room", "Wine Cellar",
    "Attic", "Boathouse", "Laundry", "Smoking Room",
]  # fmt: skip
MOTIVE_NAMES = [
    "Revenge", "Jealousy", "Greed", "Blackmail", "Ambition", "Fear", "Betrayal",
    "Inheritance", "Love", "Pride", "Madness", "Honor",
]  # fmt: skip
NAME_COUNTS = {"suspects": len(SUSPECT_NAMES), "weapons": len(WEAPON_NAMES),
               "rooms": len(ROOM_NAMES), "motives": len(MOTIVE_NAMES)}  # fmt: skip
DIRECTIONS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}


def sizes_for(players: int) -> PuzzleConfig:
    """The preset config of a difficulty level (kept for callers of the old name)."""
    return preset(players)


SIZES = PRESETS


def time_label(minutes: int) -> str:
    """Minutes after midnight (may exceed a day) -> '11:45 PM'."""
    h, m = divmod(minutes % (24 * 60), 60)
    return f"{(h - 1) % 12 + 1}:{m:02d} {'AM' if h < 12 else 'PM'}"


@dataclass
class World:
    """One full hidden world.

    Map convention: the rooms lie on a ``rows x cols`` grid; ``cells`` lists it row-major
    (row 0 is the northernmost row, column 0 the westernmost), ``None`` where there is no
    room. ``rooms`` lists the rooms in that reading order. Two rooms are adjacent when their
    cells share a side. ``suspect_rooms[s][t]`` / ``weapon_rooms[w][t]`` / ``victim_rooms[t]``
    name the room at the t-th time; ``victim_rooms`` is empty unless the victim moves.
    ``motive_of`` maps each suspect to a motive; motives may be shared when there are fewer
    motives than suspects (every listed motive belongs to at least one suspect).
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
    cells: list[str | None] = field(default_factory=list)
    victim_rooms: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cells:  # records from before irregular maps: a full grid
            self.cells = list(self.rooms)
        self._cell = {r: i for i, r in enumerate(self.cells) if r is not None}

    # --- geometry -------------------------------------------------------------------
    def neighbor(self, room: str, direction: str) -> str | None:
        """The room directly `direction` of `room`, or None (edge of the grid or a gap)."""
        r, c = divmod(self._cell[room], self.cols)
        dr, dc = DIRECTIONS[direction]
        r, c = r + dr, c + dc
        if 0 <= r < self.rows and 0 <= c < self.cols:
            return self.cells[r * self.cols + c]
        return None

    def adjacent(self, room: str) -> list[str]:
        return [n for d in DIRECTIONS if (n := self.neighbor(room, d)) is not None]

    @property
    def shared_motives(self) -> bool:
        return len(self.motives) < len(self.suspects)

    # --- subjects -------------------------------------------------------------------
    def holders(self, motive: str) -> list[str]:
        return [s for s in self.suspects if self.motive_of[s] == motive]

    def suspect_with_motive(self, motive: str) -> str:
        """The one suspect with `motive` (descriptions are only used for unshared motives)."""
        (s,) = self.holders(motive)
        return s

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
        if kind == "victim":
            return self.victim_rooms[t]
        raise ValueError(f"unknown subject type {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> World:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def random_cells(rng: random.Random, cfg: PuzzleConfig) -> list[bool]:
    """Which grid cells hold a room: all of them, or a connected random shape.

    The irregular shape grows from a random cell by random side-neighbours, and is redrawn
    (up to 100 times) until it touches every row and column, so the grid size is meaningful.
    """
    n = cfg.rows * cfg.cols
    if cfg.map == "rect":
        return [True] * n
    for _ in range(100):
        on = {rng.randrange(n)}
        while len(on) < cfg.rooms:
            frontier = sorted({
                q for i in on for q in _sides(i, cfg.rows, cfg.cols) if q not in on
            })  # fmt: skip
            on.add(rng.choice(frontier))
        if {i // cfg.cols for i in on} == set(range(cfg.rows)) and {
            i % cfg.cols for i in on
        } == set(range(cfg.cols)):
            break
    return [i in on for i in range(n)]


def _sides(i: int, rows: int, cols: int) -> list[int]:
    r, c = divmod(i, cols)
    out = []
    for dr, dc in DIRECTIONS.values():
        if 0 <= r + dr < rows and 0 <= c + dc < cols:
            out.append((r + dr) * cols + c + dc)
    return out


def random_world(rng: random.Random, cfg: PuzzleConfig | int, max_tries: int = 1000) -> World:
    """Draw a world: random walks, carried weapons, one murder (and the victim's walk).

    `cfg` is a config or a preset level. Raises RuntimeError if no suspect is ever alone
    with a weapon in `max_tries` draws of the walks.
    """
    cfg = preset(cfg) if isinstance(cfg, int) else cfg
    suspects = rng.sample(SUSPECT_NAMES, cfg.suspects)
    weapons = rng.sample(WEAPON_NAMES, cfg.weapons)
    names = iter(rng.sample(ROOM_NAMES, cfg.rooms))
    cells = [next(names) if on else None for on in random_cells(rng, cfg)]
    rooms = [c for c in cells if c is not None]
    motives = rng.sample(MOTIVE_NAMES, cfg.motives)
    start = rng.choice(range(20 * 60, 23 * 60 + 1, 15))
    step = rng.choice([15, 30, 60])
    times = [time_label(start + i * step) for i in range(cfg.times)]
    # every motive held at least once; the other suspects draw one at random
    order = rng.sample(suspects, len(suspects))
    pool = motives + [rng.choice(motives) for _ in range(len(suspects) - len(motives))]
    world = World(
        suspects, weapons, rooms, cfg.rows, cfg.cols, times, motives, {}, {},
        dict(zip(order, pool, strict=True)), "", "", "", "", list(cfg.given), cells,
    )  # fmt: skip
    T = cfg.times

    def step_from(here: str) -> str:
        # Stay with probability 0.35, else try a random direction and stay if no room lies
        # there. The proposal is symmetric, so every room is equally likely in the long run
        # (a walk to a random *neighbour* favours central rooms, which would make "the
        # best-connected room" a better-than-chance guess for every location answer).
        if rng.random() < 0.35:
            return here
        return world.neighbor(here, rng.choice(list(DIRECTIONS))) or here

    for _ in range(max_tries):
        walks = {s: [rng.choice(rooms)] for s in suspects}
        for _t in range(1, T):
            for s in suspects:
                walks[s].append(step_from(walks[s][-1]))
        carried = {w: [rng.choice(rooms)] for w in weapons}
        for t in range(1, T):
            for w in weapons:
                here = carried[w][-1]
                movers = [s for s in suspects if walks[s][t - 1] == here and walks[s][t] != here]
                if movers and rng.random() < 0.5:
                    carried[w].append(walks[rng.choice(movers)][t])
                else:
                    carried[w].append(here)
        # (time, suspect, weapon) where the suspect is alone with the weapon
        options = []
        for t in range(T):
            for s in suspects:
                room = walks[s][t]
                if sum(walks[o][t] == room for o in suspects) == 1:
                    options += [(t, s, w) for w in weapons if carried[w][t] == room]
        if options:
            t, s, w = rng.choice(options)
            world.suspect_rooms, world.weapon_rooms = walks, carried
            world.murderer, world.weapon, world.room, world.time = s, w, walks[s][t], times[t]
            if cfg.victim_moves:  # walk back from the murder; the body stays after it
                victim = [walks[s][t]] * (T - t)
                for _u in range(t):
                    victim.insert(0, step_from(victim[0]))
                world.victim_rooms = victim
            return world
    raise RuntimeError(f"no murder possible after {max_tries} random walks")
