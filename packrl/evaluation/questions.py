"""Per-question grades of Temporal Clue answer sheets, and the kind of each question.

A Temporal Clue row carries its answer key (``solution``: letter -> answer); the grader
(``packrl.tasks.temporal_clue.grader.grade``) marks each letter right or wrong. Letters do not
name the same question in every puzzle (a question the puzzle gives away up front is skipped
and the letters shift), so grades are also labelled with the question's kind, read from the
question's text in the prompt: the texts ``packrl.tasks.temporal_clue.prompt.make_questions``
writes. A public-format puzzle with other texts gets the kind ``other``.
"""

from __future__ import annotations

import re
from typing import Any

from packrl.tasks.base import completion_text
from packrl.tasks.shaping import prompt_opens_think
from packrl.tasks.temporal_clue.grader import grade
from packrl.tasks.temporal_clue.scenario import VICTIM

# (kind, pattern of the question text); the first match wins, so specific before general.
_KINDS = [
    ("who", re.compile(r"^Who murdered ")),
    ("weapon", re.compile(r"^With what weapon\?")),
    ("room", re.compile(r"^In which room\?")),
    ("time", re.compile(r"^At what time\?")),
    ("why", re.compile(r"^Why\b")),
    ("victim_room", re.compile(rf"^Where was {re.escape(VICTIM)} at ")),
    ("weapon_room", re.compile(r"^Where was the .+ at .+\?$")),
    ("suspect_room", re.compile(r"^Where was .+ at .+\?$")),
    ("suspect_motive", re.compile(r"^What was .+'s motive\?")),
    ("motive_suspect", re.compile(r"^Who was motivated by ")),
]
_QUESTION_LINE = re.compile(r"^([A-Z])\.\s+(.+?)\s*$")


def question_kind(text: str) -> str:
    """The kind of a Temporal Clue question from its text ("other" when none matches)."""
    for kind, pattern in _KINDS:
        if pattern.search(text):
            return kind
    return "other"


def question_texts(prompt: str) -> dict[str, str]:
    """Letter -> question text, from the lines after the prompt's last "Questions:" line."""
    head, sep, tail = prompt.rpartition("Questions:")
    out: dict[str, str] = {}
    for line in tail.splitlines() if sep else []:
        m = _QUESTION_LINE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def question_grades(row: dict[str, Any], completion: str) -> list[dict[str, Any]] | None:
    """Per-question grades of one completion, or None when ``row`` has no answer key.

    Returns one ``{"letter", "kind", "expected", "given", "correct"}`` per question of the
    key, graded exactly as the Temporal Clue reward grades it (reasoning blocks skipped,
    last answer line per letter, hedges wrong).
    """
    solution = row.get("solution")
    if not isinstance(solution, dict) or not solution:
        return None
    messages = row["messages"]
    texts = question_texts(str(messages[-1].get("content", "")))
    result = grade(completion_text(completion), solution, prompt_opens_think(messages))
    return [
        {**d, "kind": question_kind(texts.get(str(d["letter"]).upper(), ""))}
        for d in result.details
    ]
