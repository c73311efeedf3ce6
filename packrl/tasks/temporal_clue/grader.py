"""Grading answer sheets, and the reward functions built on it (TRL convention).

What is read, in order:

1. Reasoning. As in the math reward (``packrl.tasks.math.graded_text``), only the text after
   the last ``</think>`` is graded, and a reasoning block that never closes means no answers.
2. Answer lines. A line answers a letter the puzzle asks (upper or lower case) in any of the
   layouts models write: ``A. X``, ``A) X``, ``A: X``, ``A - X``, ``(A) X``; with markdown
   (``**A**: X``, ``**A**. X``, ``**A.** X``, ``# A. X``, ``> A. X``); after a bullet
   (``- A. X``, ``* A. X``, ``• A. X``) or a number (``1. A. X``); or as a markdown table row
   ``| A | X |`` (the row's last cell is the answer; header and rule rows name no letter).
   The **last** line for a letter is its answer, so reasoning may come first. Only one line
   counts per letter, so answering a letter twice never adds a chance: "A. X" then "A. Y"
   is graded as Y, exactly like a final ``\\boxed{}`` in math. Letters the puzzle does not
   ask are ignored. Several answers on one line ("A. X B. Y") are one answer for A.
3. Hedges are wrong. An answer is hedged when it has a "?", a "/", or one of the words
   or / maybe / perhaps / possibly / probably / likely / either / unsure that the key
   itself does not have: ``X (or Y)``, ``X or Y``, ``X/Y``, ``X?``, ``X (probably)``. Any
   other listing fails the comparison below ("X, Y" is not "X").
4. Comparison after ``normalize``: case, whitespace, punctuation, articles and parenthesised
   asides are ignored ("the lead pipe." = "Lead Pipe", "Greed (money)" = "Greed"). Times are
   read as clock times: "11:45 PM" = "11:45pm" = "11:45 p.m." = "at 11:45 PM" = "23:45";
   a time without AM/PM is on the 24-hour clock for the morning as well as the evening
   ("01:00" = "1:00" = "1:00 AM", "00:15" = "12:15 AM", "12:30" = "12:30 PM"; so "11:45" is
   11:45 AM). "midnight" and "noon" are 12:00 AM and 12:00 PM. "11 PM" is 11:00 PM.

The grader knows no entity names: everything it needs is in the letter -> answer key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from packrl.tasks.base import completion_text
from packrl.tasks.math import graded_text
from packrl.tasks.shaping import prompt_opens_think

# Decoration before the letter (quote, heading, bullet, list number), the letter (maybe in
# parentheses), and its separator. Markdown emphasis ("**", "__") is removed before matching.
_LINE = re.compile(
    r"^\s*(?:[>#]+\s*)?(?:[-*•·+]\s+)?(?:\(?\d{1,3}[.)]\s+)?"
    r"\(?([A-Za-z])\)?\s*(?:[.:)]|[-–—]\s)\s*(.*?)\s*$"
)
_CELL_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_HEDGE = re.compile(
    r"\?|/|\b(?:or|maybe|perhaps|possibly|probably|likely|either|unsure)\b", re.IGNORECASE
)
_ARTICLES = {"the", "a", "an"}
_CLOCK = re.compile(r"^(\d{1,2})(?:[:.h](\d{2}))?\s*(am|pm)?$")
_NAMED_TIMES = {"midnight": "12:00am", "noon": "12:00pm", "midday": "12:00pm"}


def _clock(s: str) -> str | None:
    """'h:mmam' / 'h:mmpm' for a clock time (see module docstring), None if ``s`` is not one."""
    s = re.sub(r"^at\s+", "", s)
    if s in _NAMED_TIMES:
        return _NAMED_TIMES[s]
    m = _CLOCK.match(s)
    if not m:
        return None
    h, mins, half = int(m.group(1)), int(m.group(2) or 0), m.group(3)
    if mins > 59:
        return None
    if half is None:  # 24-hour clock; a bare hour ("11") names no time
        if m.group(2) is None or h > 23:
            return None
        half = "am" if h < 12 else "pm"
        h = (h - 1) % 12 + 1
    elif not 1 <= h <= 12:
        return None
    return f"{h}:{mins:02d}{half}"


def normalize(answer: str) -> str:
    """Canonical form of an answer for comparison (see module docstring)."""
    s = answer.lower().strip()
    s = re.sub(r"\(.*?\)", " ", s)  # asides: "Rope (the weapon)"
    s = re.sub(r"\b([ap])\.\s*m\b\.?", r"\1m", s)  # "p.m." -> "pm"
    s = s.strip(" .*_`'\"")
    clock = _clock(s)
    if clock is not None:
        return clock
    words = [x for x in re.split(r"[^a-z0-9]+", s) if x and x not in _ARTICLES]
    return "".join(words)


def hedged(answer: str, expected: str) -> bool:
    """True if ``answer`` hedges: a "?", "/" or hedge word that ``expected`` does not have."""

    def marks(s: str) -> set[str]:
        return {m.group().lower() for m in _HEDGE.finditer(s)}

    return bool(marks(answer) - marks(expected))


def _answer_line(line: str) -> tuple[str, str] | None:
    """(letter, answer) if ``line`` is an answer line in one of the layouts, else None."""
    line = line.replace("**", "").replace("__", "")
    if line.lstrip().startswith("|"):  # table row: | A | X |
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = _CELL_LETTER.match(cells[0]) if len(cells) >= 2 else None
        return (m.group(1), cells[-1]) if m else None
    m = _LINE.match(line)
    return (m.group(1), m.group(2)) if m else None


def parse_answers(text: str, letters: list[str]) -> dict[str, str]:
    """Letter -> the last answer given for it (letters not answered are absent)."""
    wanted = {x.upper() for x in letters}
    out: dict[str, str] = {}
    for line in text.splitlines():
        found = _answer_line(line)
        if found and found[0].upper() in wanted and found[1]:
            out[found[0].upper()] = found[1]
    return out


@dataclass
class Grade:
    score: float  # fraction of questions answered correctly, 0..1
    details: list[dict[str, Any]]  # per question: letter, expected, given (None), correct


def grade(text: str, solution: dict[str, str], think_opened: bool = False) -> Grade:
    """Partial-credit grade of an answer sheet against a letter -> answer key.

    ``think_opened``: the prompt ended inside ``<think>`` (the completion starts in it).

    Raises:
        ValueError: the key is empty.
    """
    if not solution:
        raise ValueError("solution is empty: a puzzle needs at least one question")
    graded = graded_text(text, think_opened)
    given = parse_answers(graded, list(solution)) if graded is not None else {}
    details = []
    for letter, expected in solution.items():
        got = given.get(letter.upper())
        ok = (
            got is not None
            and not hedged(got, str(expected))
            and normalize(got) == normalize(str(expected))
        )
        details.append({"letter": letter, "expected": expected, "given": got, "correct": ok})
    return Grade(sum(d["correct"] for d in details) / len(details), details)


def _opened(prompts: list[Any] | None, i: int) -> bool:
    return prompts is not None and prompt_opens_think(prompts[i])


def temporal_clue_reward(completions: list[Any], solution: list[dict[str, str]],
                         prompts: list[Any] | None = None, **kwargs: Any) -> list[float]:  # fmt: skip
    """Reward = fraction of questions answered correctly (TRL reward-function convention)."""
    return [
        grade(completion_text(c), s, _opened(prompts, i)).score
        for i, (c, s) in enumerate(zip(completions, solution, strict=True))
    ]


def temporal_clue_format_reward(completions: list[Any], solution: list[dict[str, str]],
                                prompts: list[Any] | None = None, **kwargs: Any) -> list[float]:  # fmt: skip
    """Reward = fraction of questions that have an answer line, right or wrong."""
    out = []
    for i, (c, s) in enumerate(zip(completions, solution, strict=True)):
        text = graded_text(completion_text(c), _opened(prompts, i))
        out.append(len(parse_answers(text, list(s))) / len(s) if text is not None else 0.0)
    return out
