"""Answer shortcuts: how often answer-free heuristics are right, per question kind, vs chance.

A heuristic looks only at what a model sees (which names the clues mention and how often,
the order of the lists, the questions) and never reasons about the clues. Each returns the
set of candidates it cannot tell apart; its accuracy on a question is 1/|set| if the answer
is in the set, else 0 (the expected score of a guesser that breaks ties at random), so the
audit is deterministic. Chance is 1/|candidates|. A heuristic that beats chance by more than
a few points on some question kind is a leak a policy can learn instead of deducing.

Name-statistics heuristics (the ``BOUNDED`` ones: they carry no information about the
puzzle's logic, so any edge over chance is a leak):
    never_named       an entity no clue names (all candidates if every one is named)
    least_named       the entity named by the fewest clues
    most_named        the entity named by the most clues
    named_only        any entity some clue names
    first_listed      the first in the prompt's list (rooms: the map's reading order)
    last_listed       the last in that list
    middle_time       (time questions) the middle one of the times
    not_in_questions  an entity no other question names

Context heuristics (reported, not bounded: they read which clues speak of what, which is
evidence a reasoner uses too, e.g. a clue placing the Rope in the Hall at 9:30 PM is
evidence about where the Rope was at 9:45 PM):
    murder_context    named most often by clues that speak of the murder (murder room/time,
                      "the murderer", "the murder weapon", facts about how Mr. Boddy died)
    subject_context   (location questions) the room named most often in clues that name the
                      question's subject
    time_context      (location questions) the room named most often in clues at that time
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from packrl.tasks.temporal_clue.clues import names_in

Record = dict[str, Any]

# question kind -> which list of the scenario holds its candidate answers
CANDIDATES = {
    "who": "suspects", "motive_suspect": "suspects",
    "weapon": "weapons",
    "room": "rooms", "suspect_room": "rooms", "weapon_room": "rooms", "victim_room": "rooms",
    "time": "times",
    "why": "motives", "suspect_motive": "motives",
}  # fmt: skip
LOCATION_KINDS = ("suspect_room", "weapon_room", "victim_room")
BOUNDED = ("never_named", "least_named", "most_named", "named_only", "first_listed",
           "last_listed", "not_in_questions", "middle_time")  # fmt: skip


def _murderish(c: dict[str, Any]) -> bool:
    if c["family"] in ("murder_room", "murder_time", "killed"):
        return True
    subs = [c.get("subject"), c.get("weapon"), *c.get("subjects", [])]
    subs += [a.get("subject") for a in c.get("atoms", [])]
    fams = [a["family"] for a in c.get("atoms", [])]
    return "killed" in fams or any(s and s["type"] in ("murderer", "murder_weapon") for s in subs)


def _argbest(counts: dict[str, float], cands: list[str], best: Callable) -> set[str]:
    target = best(counts.get(x, 0) for x in cands)
    return {x for x in cands if counts.get(x, 0) == target}


def heuristic_sets(rec: Record, q: dict[str, Any]) -> dict[str, set[str]]:
    """Heuristic name -> the candidates it picks (ties kept) for one question of a record."""
    sc, clues = rec["scenario"], rec["clues"]
    cands = [x for x in sc[CANDIDATES[q["kind"]]] if x is not None]
    mentions = [names_in(c) for c in clues]
    named = Counter(n for ms in mentions for n in ms)
    murder = Counter(n for c, ms in zip(clues, mentions, strict=True) if _murderish(c) for n in ms)
    others = " ".join(x["text"] for x in rec["questions"] if x is not q)
    out = {
        "never_named": {x for x in cands if not named[x]} or set(cands),
        "least_named": _argbest(named, cands, min),
        "most_named": _argbest(named, cands, max),
        "named_only": {x for x in cands if named[x]} or set(cands),
        "first_listed": {cands[0]},
        "last_listed": {cands[-1]},
        "murder_context": _argbest(murder, cands, max),
        "not_in_questions": {x for x in cands if x not in others} or set(cands),
    }
    if q["kind"] in LOCATION_KINDS:
        subject = q.get("suspect") or q.get("weapon") or "Mr. Boddy"
        near = Counter(n for c, ms in zip(clues, mentions, strict=True)
                       if subject in ms or subject in c["text"] for n in ms)  # fmt: skip
        at_t = Counter(n for ms in mentions if q["time"] in ms for n in ms)
        out["subject_context"] = _argbest(near, cands, max)
        out["time_context"] = _argbest(at_t, cands, max)
    if q["kind"] == "time":
        out["middle_time"] = {cands[(len(cands) - 1) // 2]}
    return out


def question_scores(rec: Record, q: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Chance (1/|candidates|) and each heuristic's expected score on one question: 1/|picked|
    if the answer is among its picks, else 0. `audit` averages these; `balance` sums them."""
    n = len([x for x in rec["scenario"][CANDIDATES[q["kind"]]] if x is not None])
    scores = {name: 1 / len(picked) if q["answer"] in picked else 0.0
              for name, picked in heuristic_sets(rec, q).items()}  # fmt: skip
    return 1 / n, scores


def audit(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """Per question kind: n, chance, and each heuristic's accuracy and excess over chance.

    Accuracies are means over questions of that kind; ``stderr`` is the standard error of a
    heuristic's mean, so an excess within about two of them is indistinguishable from noise.
    Raises ValueError for records without structured questions (e.g. the public format).
    """
    acc: dict[str, dict[str, list[float]]] = {}
    chance: dict[str, list[float]] = {}
    for i, rec in enumerate(records):
        if "questions" not in rec or "scenario" not in rec:
            raise ValueError(f"record {i}: no 'questions'/'scenario'; the audit needs generated records")  # fmt: skip
        for q in rec["questions"]:
            kind = q["kind"]
            c, scores = question_scores(rec, q)
            chance.setdefault(kind, []).append(c)
            for name, hit in scores.items():
                acc.setdefault(kind, {}).setdefault(name, []).append(hit)
    out = {}
    for kind in sorted(acc):
        c = sum(chance[kind]) / len(chance[kind])
        rows = {}
        for name, xs in acc[kind].items():
            mean = sum(xs) / len(xs)
            var = sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1)
            rows[name] = {
                "accuracy": round(mean, 4),
                "excess": round(mean - c, 4),
                "stderr": round(math.sqrt(var / len(xs)), 4),
            }
        worst = max((k for k in rows if k in BOUNDED), key=lambda k: rows[k]["excess"])
        context = max((k for k in rows if k not in BOUNDED), key=lambda k: rows[k]["excess"])
        out[kind] = {"n": len(chance[kind]), "chance": round(c, 4), "heuristics": rows,
                     "worst": worst, "worst_excess": rows[worst]["excess"],
                     "context": context, "context_excess": rows[context]["excess"]}  # fmt: skip
    return out


def markdown_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per (file, question kind): n, chance, the best bounded heuristic and its
    accuracy, three name heuristics, and the best context heuristic (not bounded)."""
    lines = [
        "| set | question kind | n | chance % | best name heuristic | its accuracy % "
        "| excess (pts) | stderr (pts) | never named % | least named % | most named % "
        "| best context heuristic: excess (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, kinds in results.items():
        for kind, r in kinds.items():
            h = r["heuristics"]
            w = h[r["worst"]]

            def pct(x: float) -> str:
                return f"{100 * x:.1f}"

            lines.append(
                f"| {name} | {kind} | {r['n']} | {pct(r['chance'])} | {r['worst']} | "
                f"{pct(w['accuracy'])} | {100 * w['excess']:+.1f} | {pct(w['stderr'])} | "
                f"{pct(h['never_named']['accuracy'])} | {pct(h['least_named']['accuracy'])} | "
                f"{pct(h['most_named']['accuracy'])} | "
                f"{r['context']}: {100 * r['context_excess']:+.1f} |"
            )
    return "\n".join(lines)
