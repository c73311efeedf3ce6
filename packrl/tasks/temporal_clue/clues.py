"""Clues: structured statements about a world, their English text, and their truth.

A clue is a plain JSON-ready dict with a ``"family"`` key; the CP-SAT encoding of each family
lives in `model.py`. A *subject* names whoever or whatever a statement is about:

    {"type": "suspect", "name": "Mrs. White"}     {"type": "weapon", "name": "Rope"}
    {"type": "murderer"}                           {"type": "murder_weapon"}
    {"type": "motive", "name": "Greed"}            (the suspect motivated by Greed)
    {"type": "victim"}                             (Mr. Boddy, when the victim moves)

"The suspect motivated by M" presupposes that exactly one suspect has motive M; when motives
are shared, such descriptions are only made of motives with one holder, and the CP-SAT
encoding enforces the presupposition along with the clue.

Families (times are labels from the world's list; ``next_time`` is the time after ``time``):

    at          subject, room, time            the subject was in the room at the time
    motive      suspect, motive                the suspect is motivated by the motive
    either      atoms: [a, b]                  exactly one of two at/motive statements holds
    iff         atoms: [a, b]                  both hold or neither does
    same_room   subjects: [s1, s2], time       s1 and s2 were in the same room at the time
    together    subjects: [s1, s2], room       both were in the room at the same time at least once
    moved       subject, from, to, time, next_time
    carried     subject, weapon, from, to, time, next_time   (the suspect carried the weapon)
    direction   subjects: [s1, s2], direction, time  s1 was in the room directly <direction> of s2's
    murder_room subject, time                  the subject was in the murder room at the time
    murder_time relation ("before"/"after"), time   the murder happened before/after the time
    killed      what ("weapon"/"room"/"time"), value, negated   Mr. Boddy was (not) killed with/in/at
    same_motive suspects: [a, b], same (bool)  the two suspects have the same/different motives

``at``, ``motive`` and ``killed`` statements are also the atoms of ``either`` and ``iff``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from packrl.tasks.temporal_clue.config import PuzzleConfig
from packrl.tasks.temporal_clue.scenario import DIRECTIONS, VICTIM, World

Clue = dict[str, Any]
Subject = dict[str, str]


# --- text ------------------------------------------------------------------------------
def subject_text(s: Subject) -> str:
    kind = s["type"]
    if kind == "suspect":
        return s["name"]
    if kind == "weapon":
        return f"the {s['name']}"
    if kind == "murderer":
        return "the murderer"
    if kind == "murder_weapon":
        return "the murder weapon"
    if kind == "victim":
        return VICTIM
    return f"the suspect motivated by {s['name']}"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


_KILLED = {"weapon": "with the", "room": "in the", "time": "at"}


def _atom_text(a: Clue) -> str:
    if a["family"] == "at":
        return f"{subject_text(a['subject'])} was in the {a['room']} at {a['time']}"
    if a["family"] == "killed":
        nt = " not" if a.get("negated") else ""
        return f"{VICTIM} was{nt} killed {_KILLED[a['what']]} {a['value']}"
    return f"{a['suspect']} was motivated by {a['motive']}"


def clue_text(c: Clue) -> str:
    """One English sentence for a clue."""
    f = c["family"]
    if f in ("at", "motive", "killed"):
        return _cap(_atom_text(c)) + "."
    if f == "same_motive":
        a, b = c["suspects"]
        return f"{a} and {b} had {'the same motive' if c['same'] else 'different motives'}."
    if f == "either":
        a, b = c["atoms"]
        return f"Either {_atom_text(a)} or {_atom_text(b)}, but not both."
    if f == "iff":
        a, b = c["atoms"]
        return f"{_cap(_atom_text(a))} if and only if {_atom_text(b)}."
    if f == "same_room":
        s1, s2 = map(subject_text, c["subjects"])
        return f"At {c['time']}, {s1} was in the same room as {s2}."
    if f == "together":
        s1, s2 = map(subject_text, c["subjects"])
        return f"{_cap(s1)} and {s2} were both in the {c['room']} at the same time at least once."
    if f == "moved":
        s = subject_text(c["subject"])
        return (
            f"{_cap(s)} moved from the {c['from']} to the {c['to']} "
            f"between {c['time']} and {c['next_time']}."
        )
    if f == "carried":
        s, w = subject_text(c["subject"]), subject_text(c["weapon"])
        return (
            f"{_cap(s)} carried {w} from the {c['from']} to the {c['to']} "
            f"between {c['time']} and {c['next_time']}."
        )
    if f == "direction":
        s1, s2 = map(subject_text, c["subjects"])
        return f"At {c['time']}, {s1} was directly {c['direction']} of {s2}."
    if f == "murder_room":
        return f"{_cap(subject_text(c['subject']))} was in the murder room at {c['time']}."
    if f == "murder_time":
        return f"The murder happened {c['relation']} {c['time']}."
    raise ValueError(f"unknown clue family {f!r}")


# --- truth -----------------------------------------------------------------------------
def motive_subjects(c: Clue) -> list[str]:
    subs = [c.get("subject"), c.get("weapon"), *c.get("subjects", [])]
    subs += [a.get("subject") for a in c.get("atoms", [])]
    return [s["name"] for s in subs if s and s["type"] == "motive"]


def holds(c: Clue, w: World) -> bool:
    """Whether the clue is true in world `w` (false when a description has no one referent)."""
    if any(len(w.holders(m)) != 1 for m in motive_subjects(c)):
        return False
    f = c["family"]
    if f == "at":
        return w.room_of(c["subject"], c["time"]) == c["room"]
    if f == "motive":
        return w.motive_of[c["suspect"]] == c["motive"]
    if f == "killed":
        value = {"weapon": w.weapon, "room": w.room, "time": w.time}[c["what"]]
        return (value == c["value"]) != bool(c.get("negated"))
    if f == "same_motive":
        a, b = c["suspects"]
        return (w.motive_of[a] == w.motive_of[b]) == c["same"]
    if f == "either":
        return sum(holds(a, w) for a in c["atoms"]) == 1
    if f == "iff":
        a, b = c["atoms"]
        return holds(a, w) == holds(b, w)
    if f == "same_room":
        s1, s2 = c["subjects"]
        return w.room_of(s1, c["time"]) == w.room_of(s2, c["time"])
    if f == "together":
        s1, s2 = c["subjects"]
        return any(w.room_of(s1, t) == c["room"] == w.room_of(s2, t) for t in w.times)
    if f in ("moved", "carried"):
        movers = [c["subject"]] + ([c["weapon"]] if f == "carried" else [])
        return all(
            w.room_of(s, c["time"]) == c["from"] and w.room_of(s, c["next_time"]) == c["to"]
            for s in movers
        )
    if f == "direction":
        s1, s2 = c["subjects"]
        t = c["time"]
        return w.neighbor(w.room_of(s2, t), c["direction"]) == w.room_of(s1, t)
    if f == "murder_room":
        return w.room_of(c["subject"], c["time"]) == w.room
    if f == "murder_time":
        murder, t = w.times.index(w.time), w.times.index(c["time"])
        return murder < t if c["relation"] == "before" else murder > t
    raise ValueError(f"unknown clue family {f!r}")


def names_in(c: Clue) -> set[str]:
    """Every entity name a clue mentions: suspects, weapons, motives, rooms, times, values.

    Read from the structure, not the text, so that "Trophy" is not found in "Trophy Room".
    """
    out: set[str] = set()
    for k, v in c.items():
        if k in ("family", "text", "relation", "direction", "what", "negated", "same"):
            continue
        if isinstance(v, str):
            out.add(v)
        elif isinstance(v, dict):
            out |= {v["name"]} if "name" in v else set()
        elif isinstance(v, list):
            for x in v:
                if isinstance(x, str):
                    out.add(x)
                elif "family" in x:
                    out |= names_in(x)
                elif "name" in x:
                    out.add(x["name"])
    return out


# --- sampling true clues ---------------------------------------------------------------
def _entity(s: Subject, w: World) -> str:
    """The suspect or weapon a subject refers to in world `w`."""
    kind = s["type"]
    if kind in ("suspect", "weapon"):
        return s["name"]
    if kind == "murderer":
        return w.murderer
    if kind == "murder_weapon":
        return w.weapon
    if kind == "victim":
        return VICTIM
    return w.suspect_with_motive(s["name"])


def describable_motives(w: World) -> list[str]:
    """Motives that "the suspect motivated by M" can describe: those with one holder."""
    return [m for m in w.motives if len(w.holders(m)) == 1]


def _subject(rng: random.Random, w: World, people: bool = True, things: bool = True) -> Subject:
    """A random subject; named ones 60% of the time, descriptions ("the murderer") 40%."""
    named = [{"type": "suspect", "name": s} for s in w.suspects] if people else []
    named += [{"type": "weapon", "name": x} for x in w.weapons] if things else []
    described = [{"type": "murderer"}] + [
        {"type": "motive", "name": m} for m in describable_motives(w)
    ]
    described = described if people else []
    described += [{"type": "murder_weapon"}] if things else []
    return rng.choice(named if rng.random() < 0.6 else described)


def _pair(rng: random.Random, w: World) -> tuple[Subject, Subject]:
    """Two random subjects that refer to different suspects/weapons (or the victim).

    When the victim walks, the second one is him 15% of the time: his own clues ("was in",
    "moved") cannot say that he stayed put, so without these a question about where he
    was can be impossible to settle.
    """
    while True:
        s1 = _subject(rng, w, things=rng.random() < 0.3)
        s2 = _subject(rng, w)
        if w.victim_rooms and rng.random() < 0.15:
            s2 = {"type": "victim"}
        if _entity(s1, w) != _entity(s2, w):
            return s1, s2


def _atom(rng: random.Random, w: World, truth: bool) -> Clue:
    """A random at/motive statement with the given truth value."""
    if w.victim_rooms and rng.random() < 0.15:  # a fact about the murder itself
        # Never a true "killed with the X": it would settle the weapon without naming the
        # other weapons, and every weapon must be named (selection.must_name); false ones
        # ("not killed with") name the weapon they rule out.
        what = rng.choice(["weapon", "room", "time"] if not truth else ["room", "time"])
        key = {"weapon": w.weapon, "room": w.room, "time": w.time}[what]
        values = {"weapon": w.weapons, "room": w.rooms, "time": w.times}[what]
        value = key if truth else rng.choice([v for v in values if v != key])
        return {"family": "killed", "what": what, "value": value}
    if rng.random() < 0.25:
        s = rng.choice(w.suspects)
        options = [m for m in w.motives if (w.motive_of[s] == m) == truth]
        return {"family": "motive", "suspect": s, "motive": rng.choice(options)}
    s, t = _subject(rng, w), rng.choice(w.times)
    here = w.room_of(s, t)
    room = here if truth else rng.choice([r for r in w.rooms if r != here])
    return {"family": "at", "subject": s, "room": room, "time": t}


def _fact(rng: random.Random, w: World) -> Clue | None:
    kind = rng.choice(["suspect", "suspect", "weapon"])
    s = {"type": kind, "name": rng.choice(w.suspects if kind == "suspect" else w.weapons)}
    t = rng.choice(w.times)
    return {"family": "at", "subject": s, "room": w.room_of(s, t), "time": t}


def _motive(rng: random.Random, w: World) -> Clue | None:
    s = rng.choice(w.suspects)
    return {"family": "motive", "suspect": s, "motive": w.motive_of[s]}


def _described(rng: random.Random, w: World) -> Clue | None:
    s = rng.choice([{"type": "murderer"}, {"type": "murder_weapon"}] + [
        {"type": "motive", "name": m} for m in describable_motives(w)
    ])  # fmt: skip
    t = rng.choice(w.times)
    return {"family": "at", "subject": s, "room": w.room_of(s, t), "time": t}


def _either(rng: random.Random, w: World) -> Clue | None:
    atoms = [_atom(rng, w, True), _atom(rng, w, False)]
    rng.shuffle(atoms)
    return {"family": "either", "atoms": atoms}


def _iff(rng: random.Random, w: World) -> Clue | None:
    truth = rng.random() < 0.5
    return {"family": "iff", "atoms": [_atom(rng, w, truth), _atom(rng, w, truth)]}


def _same_room(rng: random.Random, w: World) -> Clue | None:
    t = rng.choice(w.times)
    for _ in range(20):
        s1, s2 = _pair(rng, w)
        if w.room_of(s1, t) == w.room_of(s2, t):
            return {"family": "same_room", "subjects": [s1, s2], "time": t}
    return None


def _together(rng: random.Random, w: World) -> Clue | None:
    for _ in range(20):
        s1, s2 = _pair(rng, w)
        rooms = sorted({w.room_of(s1, t) for t in w.times if w.room_of(s1, t) == w.room_of(s2, t)})
        if rooms:
            return {"family": "together", "subjects": [s1, s2], "room": rng.choice(rooms)}
    return None


def _moves(w: World, s: Subject) -> list[tuple[str, str, str, str]]:
    """(from, to, time, next_time) for every move the subject made."""
    out = []
    for t0, t1 in zip(w.times, w.times[1:], strict=False):
        a, b = w.room_of(s, t0), w.room_of(s, t1)
        if a != b:
            out.append((a, b, t0, t1))
    return out


def _moved(rng: random.Random, w: World) -> Clue | None:
    s = _subject(rng, w, things=rng.random() < 0.3)
    moves = _moves(w, s)
    if not moves:
        return None
    a, b, t0, t1 = rng.choice(moves)
    return {"family": "moved", "subject": s, "from": a, "to": b, "time": t0, "next_time": t1}


def _carried(rng: random.Random, w: World) -> Clue | None:
    weapon = _subject(rng, w, people=False)
    moves = _moves(w, weapon)
    if not moves:
        return None
    a, b, t0, t1 = rng.choice(moves)
    for _ in range(20):
        s = _subject(rng, w, things=False)
        if w.room_of(s, t0) == a and w.room_of(s, t1) == b:
            return {"family": "carried", "subject": s, "weapon": weapon, "from": a, "to": b,
                    "time": t0, "next_time": t1}  # fmt: skip
    return None


def _direction(rng: random.Random, w: World) -> Clue | None:
    t = rng.choice(w.times)
    for _ in range(20):
        s1, s2 = _pair(rng, w)
        for d in DIRECTIONS:
            if w.neighbor(w.room_of(s2, t), d) == w.room_of(s1, t):
                return {"family": "direction", "subjects": [s1, s2], "direction": d, "time": t}
    return None


def _murder_room(rng: random.Random, w: World) -> Clue | None:
    t = rng.choice(w.times)
    there = [s for s in [_subject(rng, w) for _ in range(10)] if w.room_of(s, t) == w.room]
    if not there or (t == w.time and there[0]["type"] in ("murderer", "murder_weapon")):
        return None
    return {"family": "murder_room", "subject": there[0], "time": t}


def _murder_time(rng: random.Random, w: World) -> Clue | None:
    t = rng.choice([x for x in w.times if x != w.time])
    relation = "before" if w.times.index(w.time) < w.times.index(t) else "after"
    return {"family": "murder_time", "relation": relation, "time": t}


def _victim_at(rng: random.Random, w: World) -> Clue | None:
    if not w.victim_rooms:
        return None
    t = rng.choice(w.times[: w.times.index(w.time) + 1])  # after the murder it is the murder room
    return {"family": "at", "subject": {"type": "victim"}, "room": w.room_of({"type": "victim"}, t), "time": t}  # fmt: skip


def _victim_moved(rng: random.Random, w: World) -> Clue | None:
    if not w.victim_rooms:
        return None
    moves = _moves(w, {"type": "victim"})
    if not moves:
        return None
    a, b, t0, t1 = rng.choice(moves)
    return {"family": "moved", "subject": {"type": "victim"}, "from": a, "to": b, "time": t0, "next_time": t1}  # fmt: skip


def _killed(rng: random.Random, w: World) -> Clue | None:
    """A true negative fact about the murder: "Mr. Boddy was not killed with the Rope"."""
    what = rng.choice(["weapon", "room", "time"])
    key = {"weapon": w.weapon, "room": w.room, "time": w.time}[what]
    values = {"weapon": w.weapons, "room": w.rooms, "time": w.times}[what]
    value = rng.choice([v for v in values if v != key])
    return {"family": "killed", "what": what, "value": value, "negated": True}


def _same_motive(rng: random.Random, w: World) -> Clue | None:
    a, b = rng.sample(w.suspects, 2)
    return {"family": "same_motive", "suspects": [a, b], "same": w.motive_of[a] == w.motive_of[b]}


# Samplers by name; the names are the keys of a clue mix (the ``clue_weights`` knob).
SAMPLERS: dict[str, Callable[[random.Random, World], Clue | None]] = {
    "fact": _fact,
    "motive": _motive,
    "described": _described,
    "either": _either,
    "iff": _iff,
    "same_room": _same_room,
    "together": _together,
    "moved": _moved,
    "carried": _carried,
    "direction": _direction,
    "murder_room": _murder_room,
    "murder_time": _murder_time,
    "victim_at": _victim_at,
    "victim_moved": _victim_moved,
    "killed": _killed,
    "same_motive": _same_motive,
}
FAMILIES = tuple(SAMPLERS)

# Relative weights of the samplers at the easiest (level 1) and hardest (level 6 and up)
# settings; levels in between interpolate. Harder puzzles lean on indirect clues. The
# victim and shared-motive families join only where the scenario has them.
MIX_EASY = {"fact": 3, "motive": 2, "described": 2, "either": 1, "iff": 0.5, "same_room": 1,
            "together": 1, "moved": 1, "carried": 1, "direction": 1, "murder_room": 1,
            "murder_time": 1, "victim_at": 1, "victim_moved": 1, "killed": 0.5,
            "same_motive": 1}  # fmt: skip
MIX_HARD = {"fact": 0.5, "motive": 0.5, "described": 1.5, "either": 2, "iff": 2, "same_room": 1.5,
            "together": 1.5, "moved": 1.5, "carried": 1, "direction": 1.5,
            "murder_room": 1, "murder_time": 1, "victim_at": 0.75, "victim_moved": 0.75,
            "killed": 0.5, "same_motive": 1}  # fmt: skip


def clue_mix(cfg: PuzzleConfig) -> dict[str, float]:
    """Sampler -> weight for a config: its ``clue_weights``, or the level's default mix."""
    if cfg.clue_weights is not None:
        return {k: float(v) for k, v in cfg.clue_weights.items() if v > 0}
    a = min(1.0, (cfg.level - 1) / 5)
    mix = {k: (1 - a) * MIX_EASY[k] + a * MIX_HARD[k] for k in MIX_EASY}
    if not cfg.victim_moves:
        for k in ("victim_at", "victim_moved", "killed"):
            mix.pop(k)
    if cfg.motives == cfg.suspects:
        mix.pop("same_motive")
    return mix


def sample_clue(rng: random.Random, w: World, sampler: str) -> Clue | None:
    """A random clue from one sampler, true in `w` by construction (None if none was found)."""
    c = SAMPLERS[sampler](rng, w)
    if c is None:
        return None
    c["text"] = clue_text(c)
    assert holds(c, w), c  # the samplers build true statements; a false one is a bug here
    return c
