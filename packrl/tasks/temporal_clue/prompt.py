"""Questions about a world, and the prompt text a model sees."""

from __future__ import annotations

import random
import string
from typing import Any

from packrl.tasks.temporal_clue.clues import Clue
from packrl.tasks.temporal_clue.scenario import VICTIM, World

Question = dict[str, Any]


def make_questions(w: World, rng: random.Random, bonus: int) -> list[Question]:
    """The main questions not given away up front, then `bonus` location/motive questions.

    Each question is ``{"letter", "kind", "text", "answer", ...}``; bonus questions also
    name their ``suspect``/``weapon`` and ``time``.
    """
    main = [
        {"kind": "who", "text": f"Who murdered {VICTIM}?", "answer": w.murderer},
        {"kind": "weapon", "text": "With what weapon?", "answer": w.weapon},
        {"kind": "room", "text": "In which room?", "answer": w.room},
        {"kind": "time", "text": "At what time?", "answer": w.time},
        {"kind": "why", "text": "Why (the murderer's motive)?", "answer": w.motive_of[w.murderer]},
    ]
    qs = [q for q in main if q["kind"] not in w.given]
    extra: list[Question] = []
    for t in w.times:
        for s in w.suspects:
            if not (s == w.murderer and t == w.time):  # that one is the murder room
                extra.append({"kind": "suspect_room", "text": f"Where was {s} at {t}?",
                              "answer": w.suspect_rooms[s][w.times.index(t)], "suspect": s, "time": t})  # fmt: skip
        for x in w.weapons:
            if not (x == w.weapon and t == w.time):
                extra.append({"kind": "weapon_room", "text": f"Where was the {x} at {t}?",
                              "answer": w.weapon_rooms[x][w.times.index(t)], "weapon": x, "time": t})  # fmt: skip
    for s in w.suspects:
        if s != w.murderer:
            extra.append({"kind": "suspect_motive", "text": f"What was {s}'s motive?",
                          "answer": w.motive_of[s], "suspect": s})  # fmt: skip
    qs += rng.sample(extra, bonus)
    return [{"letter": string.ascii_uppercase[i], **q} for i, q in enumerate(qs)]


def _stated(c: Clue) -> set[tuple[str, str]]:
    """(name, time) locations and (suspect, "motive") facts a clue states outright."""
    f = c["family"]
    if f == "motive":
        return {(c["suspect"], "motive")}
    named = [c.get("subject"), c.get("weapon")]
    named = [s["name"] for s in named if s and s["type"] in ("suspect", "weapon")]
    if f == "at":
        return {(n, c["time"]) for n in named}
    if f in ("moved", "carried"):
        return {(n, t) for n in named for t in (c["time"], c["next_time"])}
    return set()


def giveaway(c: Clue, questions: list[Question]) -> bool:
    """Whether a clue states the answer to an asked bonus question outright."""
    stated = _stated(c)
    for q in questions:
        if q["kind"] == "suspect_motive" and (q["suspect"], "motive") in stated:
            return True
        if q["kind"] in ("suspect_room", "weapon_room"):
            if (q.get("suspect", q.get("weapon")), q["time"]) in stated:
                return True
    return False


RULES = f"""Rules:
- At each time, every suspect and every weapon is in exactly one room.
- From one time to the next, a suspect either stays put or moves to a room directly north, south, east or west of their room.
- A weapon moves only when a suspect carries it, making the same move.
- Each suspect has a different motive.
- {VICTIM} was murdered at one of the times, in one room, with one weapon, by the one suspect who was alone with him there: no other suspect was in that room at that time, and the murder weapon was.
- "Directly north of" means in the neighbouring room to the north (likewise south, east, west)."""


def make_prompt(w: World, clues: list[Clue], questions: list[Question]) -> str:
    """The full puzzle text: board, rules, clues, questions and the answer format."""
    grid = [" | ".join(w.rooms[r * w.cols : (r + 1) * w.cols]) for r in range(w.rows)]
    known = []
    if "time" in w.given:
        known.append(f"{VICTIM} was murdered at {w.time}.")
    if "room" in w.given:
        known.append(f"{VICTIM} was murdered in the {w.room}.")
    parts = [
        f"{VICTIM} has been murdered in his mansion. Solve the mystery from the clues.",
        "The rooms lie on a grid (north is up):\n" + "\n".join(grid),
        f"Suspects: {', '.join(w.suspects)}\n"
        f"Weapons: {', '.join(w.weapons)}\n"
        f"Motives: {', '.join(w.motives)}\n"
        f"Times: {', '.join(w.times)}",
        RULES,
    ]
    if known:
        parts.append("Known: " + " ".join(known))
    parts.append("Clues:\n" + "\n".join(f"{i + 1}. {c['text']}" for i, c in enumerate(clues)))
    parts.append("Questions:\n" + "\n".join(f"{q['letter']}. {q['text']}" for q in questions))
    parts.append(
        'Think it through, then end with one line per question in the form "A. <answer>", '
        "using the names and times exactly as listed above."
    )
    return "\n\n".join(parts)
