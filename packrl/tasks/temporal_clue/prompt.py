"""Questions about a world, and the prompt text a model sees."""

from __future__ import annotations

import random
import string
from typing import Any

from packrl.tasks.temporal_clue.clues import Clue
from packrl.tasks.temporal_clue.scenario import VICTIM, World

Question = dict[str, Any]


def _bonus_pool(w: World, kinds: tuple[str, ...]) -> list[Question]:
    """Every bonus question of the given kinds the world allows.

    None is left out for touching the murder (e.g. the murderer's own motive, or a room at
    the murder time): leaving those out would tell which suspect, weapon or time is *not*
    the murder's, an answer shortcut (tools/audit_puzzles.py, "not_in_questions").
    """
    out: list[Question] = []
    for ti, t in enumerate(w.times):
        for s in w.suspects:
            if "suspect_room" in kinds:
                out.append({"kind": "suspect_room", "text": f"Where was {s} at {t}?",
                            "answer": w.suspect_rooms[s][ti], "suspect": s, "time": t})  # fmt: skip
        for x in w.weapons:
            if "weapon_room" in kinds:
                out.append({"kind": "weapon_room", "text": f"Where was the {x} at {t}?",
                            "answer": w.weapon_rooms[x][ti], "weapon": x, "time": t})  # fmt: skip
        if "victim_room" in kinds and w.victim_rooms:
            out.append({"kind": "victim_room", "text": f"Where was {VICTIM} at {t}?",
                        "answer": w.victim_rooms[ti], "time": t})  # fmt: skip
    for s in w.suspects:
        if "suspect_motive" in kinds:
            out.append({"kind": "suspect_motive", "text": f"What was {s}'s motive?",
                        "answer": w.motive_of[s], "suspect": s})  # fmt: skip
    for mo in w.motives:
        holders = w.holders(mo)
        if "motive_suspect" in kinds and len(holders) == 1:
            out.append({"kind": "motive_suspect", "text": f"Who was motivated by {mo}?",
                        "answer": holders[0], "motive": mo})  # fmt: skip
    return out


def make_questions(w: World, rng: random.Random, bonus: int,
                   kinds: tuple[str, ...] = ("suspect_room", "weapon_room", "suspect_motive"),
                   ) -> list[Question]:  # fmt: skip
    """The main questions not given away up front, then `bonus` questions of `kinds`.

    Each question is ``{"letter", "kind", "text", "answer", ...}``; bonus questions also
    name their ``suspect``/``weapon``/``motive`` and ``time``. Bonus kinds take turns (each
    kind once, in random order, before any repeats), so rare kinds are not drowned by the
    many location questions.
    Raises ValueError if the world offers fewer than `bonus` bonus questions.
    """
    main = [
        {"kind": "who", "text": f"Who murdered {VICTIM}?", "answer": w.murderer},
        {"kind": "weapon", "text": "With what weapon?", "answer": w.weapon},
        {"kind": "room", "text": "In which room?", "answer": w.room},
        {"kind": "time", "text": "At what time?", "answer": w.time},
        {"kind": "why", "text": "Why (the murderer's motive)?", "answer": w.motive_of[w.murderer]},
    ]
    qs = [q for q in main if q["kind"] not in w.given]
    pool = _bonus_pool(w, kinds)
    if len(pool) < bonus:
        raise ValueError(f"bonus: the world offers only {len(pool)} bonus questions, asked for {bonus}")  # fmt: skip
    order: list[str] = []
    for _ in range(bonus):
        if not order:  # every kind once, in random order, before any kind repeats
            order = rng.sample(sorted({q["kind"] for q in pool}), len({q["kind"] for q in pool}))
        kind = order.pop()
        q = rng.choice([q for q in pool if q["kind"] == kind])
        pool.remove(q)
        qs.append(q)
    return [{"letter": string.ascii_uppercase[i], **q} for i, q in enumerate(qs)]


def _stated(c: Clue) -> set[tuple[str, str]]:
    """(name, time) locations and (suspect, "motive") facts a clue states outright."""
    f = c["family"]
    if f == "motive":
        return {(c["suspect"], "motive"), (c["motive"], "holder")}
    named = [c.get("subject"), c.get("weapon")]
    named = [VICTIM if s["type"] == "victim" else s["name"] for s in named
             if s and s["type"] in ("suspect", "weapon", "victim")]  # fmt: skip
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
        if q["kind"] == "motive_suspect" and (q["motive"], "holder") in stated:
            return True
        if q["kind"] in ("suspect_room", "weapon_room", "victim_room"):
            if (q.get("suspect", q.get("weapon", VICTIM)), q["time"]) in stated:
                return True
    return False


MAP_CONVENTION = (
    "row-major grid of rows x cols cells; row 0 is north, column 0 is west; null marks a cell "
    "without a room; rooms whose cells share a side are adjacent"
)


def rules_record(w: World) -> dict[str, str]:
    """The rules a puzzle was generated under, for an independent checker (record field).

    Machine-readable values; `rules_text` says the same in English for the prompt:
        moves       "stay_or_adjacent": per time step, stay or move to a side-sharing room
        weapons     "carried_only": a weapon moves only with a suspect making the same move
        murder      "alone_with_weapon": murderer and weapon in the murder room at the murder
                    time, no other suspect there
        victim      "not_tracked", or "walks_until_murder": the victim moves like a suspect,
                    is in the murder room at the murder time and stays there afterwards
        motives     "all_different" (a permutation) or "shared_each_held": one motive per
                    suspect, every listed motive held by at least one suspect
        described_motive  "unique_holder": "the suspect motivated by M" asserts that exactly
                    one suspect has M (part of the clue's truth)
        given       the main facts stated up front (list)
    """
    return {
        "moves": "stay_or_adjacent",
        "weapons": "carried_only",
        "murder": "alone_with_weapon",
        "victim": "walks_until_murder" if w.victim_rooms else "not_tracked",
        "motives": "shared_each_held" if w.shared_motives else "all_different",
        "described_motive": "unique_holder",
        "given": list(w.given),
    }


def rules_text(w: World) -> str:
    """The rules section of the prompt, in English."""
    lines = [
        "Rules:",
        "- At each time, every suspect and every weapon is in exactly one room.",
        "- From one time to the next, a suspect either stays put or moves to a room directly "
        "north, south, east or west of their room.",
        "- A weapon moves only when a suspect carries it, making the same move.",
    ]
    if w.shared_motives:
        lines += [
            "- Each suspect has exactly one motive. Every listed motive belongs to at least one "
            "suspect, and several suspects may share a motive.",
            '- "The suspect motivated by M" is said only of a motive that exactly one suspect has.',
        ]
    else:
        lines.append("- Each suspect has a different motive.")
    lines.append(
        f"- {VICTIM} was murdered at one of the times, in one room, with one weapon, by the one "
        "suspect who was alone with him there: no other suspect was in that room at that time, "
        "and the murder weapon was."
    )
    if w.victim_rooms:
        lines.append(
            f"- Before the murder, {VICTIM} also stayed put or moved one room north, south, east "
            "or west per time; from the murder on, his body stayed in the murder room."
        )
    lines.append(
        '- "Directly north of" means in the neighbouring room to the north (likewise south, '
        "east, west)."
    )
    return "\n".join(lines)


def map_text(w: World) -> str:
    """The grid of rooms, one row per line, north at the top."""
    rows = [
        " | ".join(c or "(no room)" for c in w.cells[r * w.cols : (r + 1) * w.cols])
        for r in range(w.rows)
    ]
    gaps = ' ("(no room)" marks a spot without a room)' if None in w.cells else ""
    return f"The rooms lie on a grid (north is up){gaps}:\n" + "\n".join(rows)


_KNOWN = {
    "who": lambda w: f"{VICTIM} was murdered by {w.murderer}.",
    "weapon": lambda w: f"{VICTIM} was murdered with the {w.weapon}.",
    "room": lambda w: f"{VICTIM} was murdered in the {w.room}.",
    "time": lambda w: f"{VICTIM} was murdered at {w.time}.",
    "why": lambda w: f"The murderer was motivated by {w.motive_of[w.murderer]}.",
}


def make_prompt(w: World, clues: list[Clue], questions: list[Question]) -> str:
    """The full puzzle text: board, rules, clues, questions and the answer format."""
    known = [_KNOWN[g](w) for g in ("who", "weapon", "time", "room", "why") if g in w.given]
    parts = [
        f"{VICTIM} has been murdered in his mansion. Solve the mystery from the clues.",
        map_text(w),
        f"Suspects: {', '.join(w.suspects)}\n"
        f"Weapons: {', '.join(w.weapons)}\n"
        f"Motives: {', '.join(w.motives)}\n"
        f"Times: {', '.join(w.times)}",
        rules_text(w),
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
