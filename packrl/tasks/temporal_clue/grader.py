"""Grading answer sheets, and the reward functions built on it (TRL convention).

An answer is a line "A. <answer>" (also "A) ...", "A: ...", "**A.** ...", lower-case
letters). Only letters the puzzle asks count, and the last line for a letter wins, so a
model may think aloud first. Answers are compared after `normalize`: case, whitespace,
punctuation, articles and parenthesised asides are ignored, and times are read as clock
times ("11:45 PM" = "11:45pm" = "23:45").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_LINE = re.compile(r"^[\s>*_#`\-]*\(?([A-Za-z])\s*[.):]\s*(.*?)\s*$")
_ARTICLES = {"the", "a", "an"}
_CLOCK = re.compile(r"^(\d{1,2})(?:[:.h](\d{2}))?\s*(am|pm)?$")


def normalize(answer: str) -> str:
    """Canonical form of an answer for comparison (see module docstring)."""
    s = answer.lower().strip()
    s = re.sub(r"\(.*?\)", " ", s)  # asides: "Rope (the weapon)"
    s = re.sub(r"\b([ap])\.\s*m\b\.?", r"\1m", s)  # "p.m." -> "pm"
    s = s.strip(" .*_`'\"")
    clock = _CLOCK.match(re.sub(r"^at\s+", "", s))
    if clock:
        h, mins, half = int(clock.group(1)), int(clock.group(2) or 0), clock.group(3)
        if half is None and h >= 13:  # 24-hour clock
            h, half = h - 12, "pm"
        elif half is None and h == 0:
            h, half = 12, "am"
        return f"{h}:{mins:02d}{half or ''}"
    words = [x for x in re.split(r"[^a-z0-9]+", s) if x and x not in _ARTICLES]
    return "".join(words)


def parse_answers(text: str, letters: list[str]) -> dict[str, str]:
    """Letter -> the last answer given for it (letters not answered are absent)."""
    wanted = {x.upper() for x in letters}
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(1).upper() in wanted and m.group(2):
            out[m.group(1).upper()] = m.group(2)
    return out


@dataclass
class Grade:
    score: float  # fraction of questions answered correctly, 0..1
    details: list[dict[str, Any]]  # per question: letter, expected, given (None), correct


def grade(text: str, solution: dict[str, str]) -> Grade:
    """Partial-credit grade of an answer sheet against a letter -> answer key."""
    if not solution:
        raise ValueError("solution is empty: a puzzle needs at least one question")
    given = parse_answers(text, list(solution))
    details = []
    for letter, expected in solution.items():
        got = given.get(letter.upper())
        ok = got is not None and normalize(got) == normalize(str(expected))
        details.append({"letter": letter, "expected": expected, "given": got, "correct": ok})
    return Grade(sum(d["correct"] for d in details) / len(details), details)


def _text(completion: Any) -> str:
    """TRL passes either strings or conversational completions (lists of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")  # fmt: skip


def temporal_clue_reward(completions: list[Any], solution: list[dict[str, str]],
                         **kwargs: Any) -> list[float]:  # fmt: skip
    """Reward = fraction of questions answered correctly (TRL reward-function convention)."""
    return [grade(_text(c), s).score for c, s in zip(completions, solution, strict=True)]


def temporal_clue_format_reward(completions: list[Any], solution: list[dict[str, str]],
                                **kwargs: Any) -> list[float]:  # fmt: skip
    """Reward = fraction of questions that have an answer line, right or wrong."""
    return [
        len(parse_answers(_text(c), list(s))) / len(s)
        for c, s in zip(completions, solution, strict=True)
    ]
