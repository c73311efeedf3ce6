"""Math: final-answer extraction, the math-verify correctness reward, and ``math_task``.

The reward pulls the final answer out of a completion (last ``\\boxed{}``, else last
``<answer>...</answer>``, else the last "answer is ..."), then checks it against the gold
answer with math-verify, gold first. Both strings are parsed as LaTeX first and as plain
expressions second, so a gold answer written as ``85``, ``3/4`` or ``x = 2`` still scores
(parsing the gold as LaTeX only is a common way to score every answer 0).

math-verify can hang in C code on inputs such as ``10^{10^{10}}``, and its own timeouts use
``signal.alarm``, which only works in a main thread. So checks run in the main thread of
worker processes (``packrl.execution.workers``) with a hard outer deadline. Keep torch out of this
module: the workers import it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from packrl.execution.workers import shared_pool
from packrl.tasks.base import Task
from packrl.tasks.data import check_column, load_task_rows, split_rows

log = logging.getLogger(__name__)

# Seconds: math-verify's own (alarm-based) limits inside the worker, and the hard outer
# deadline after which the worker is killed and the sample scores 0.
PARSE_TIMEOUT_S = 2
VERIFY_TIMEOUT_S = 2
DEADLINE_S = 5.0
# A final answer longer than this is not an answer; skipping it keeps junk out of sympy.
MAX_ANSWER_CHARS = 1000

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
# An "answer is" sentence ends at ". ", ", " or "; " (not at the dot of "3.5").
_SENTENCE_END = re.compile(r"[.,;]\s")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces allowed."""
    matches = list(_BOXED.finditer(text))
    for m in reversed(matches):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        # unbalanced: try an earlier one
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer in ``completion``, or None if it states none.

    Order: last ``\\boxed{}``; else last ``<answer>`` tag (its own ``\\boxed{}`` wins if it
    has one); else the text after the last "answer is" / "answer:" on its line.
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed or None
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip() or None
    found = None
    for line in completion.splitlines():
        for m in _ANSWER_IS.finditer(line):
            found = line[m.end() :]
    if found is None:
        return None
    found = _SENTENCE_END.split(found + " ", maxsplit=1)[0]
    # "The answer is **85**." -> "85"; "$85$" is kept (LaTeX parsing handles the dollars).
    found = found.strip().strip("*. ")
    return found or None


def _parse(text: str, timeout: int) -> list:
    from math_verify import parse

    # LaTeX first (wrapped in $...$ so that unanchored forms like \sqrt{2} or \dfrac12
    # parse), then plain expressions ("1/2", "0.75").
    parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed or parse(text, parsing_timeout=timeout)


def verify_answer(gold: str, answer: str) -> float:
    """1.0 if ``answer`` equals ``gold`` according to math-verify, else 0.0.

    Runs math-verify directly: call it only in a main thread (as the workers do).
    """
    from math_verify import verify

    gold_parsed = _parse(gold, PARSE_TIMEOUT_S)
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} cannot be parsed by math-verify")
    answer_parsed = _parse(answer, PARSE_TIMEOUT_S)
    if not answer_parsed:
        return 0.0
    return float(verify(gold_parsed, answer_parsed, timeout_seconds=VERIFY_TIMEOUT_S))


def warm_up() -> None:
    """Imports math-verify and builds its parsers (the first parse takes about a second)."""
    verify_answer("\\frac{1}{2}", "0.5")


def math_accuracy(
    completions: Sequence[str], answer: Sequence[Any], deadline_s: float | None = None, **kwargs
) -> list[float]:
    """Reward: 1.0 when the completion's final answer matches the ``answer`` column, else 0.0.

    Checks run in the shared worker pool, each with a hard deadline (``DEADLINE_S``); a
    check that passes it scores 0. The whole batch ends within about
    ``deadline_s * ceil(N / workers)``.
    """
    deadline = DEADLINE_S if deadline_s is None else deadline_s
    if len(answer) != len(completions):
        raise ValueError(
            f"math_accuracy: {len(completions)} completions but {len(answer)} 'answer' values"
        )
    rewards = [0.0] * len(completions)
    todo = []
    for i, (completion, gold) in enumerate(zip(completions, answer, strict=True)):
        if gold is None or not str(gold).strip():
            raise ValueError(f"math_accuracy: sample {i} has an empty 'answer' ({gold!r})")
        pred = extract_answer(completion)
        if pred is not None and len(pred) <= MAX_ANSWER_CHARS:
            todo.append((i, str(gold), pred))
    if not todo:
        return rewards
    pool = shared_pool()
    results = pool.map(verify_answer, [(g, p) for _, g, p in todo], timeout_s=deadline)
    for (i, _, pred), res in zip(todo, results, strict=True):
        if res.ok:
            rewards[i] = float(res.value)
        else:
            if res.error.startswith("ValueError: gold answer"):
                raise ValueError(res.error)  # a data bug, not a model failure: be loud
            log.warning("math_accuracy: sample %d (answer %.60r) scored 0: %s", i, pred, res.error)
    return rewards


MATH_PROMPT_TEMPLATE = "{prompt}\n\nPut your final answer in \\boxed{{}}."


def boxed_format(completions: Sequence[str], **kwargs) -> list[float]:
    """Reward: 1.0 when the completion puts a non-empty final answer in ``\\boxed{}``, else 0.0.

    A small shaping term beside ``math_accuracy``: a small model that writes "44 + 21 = 65"
    without the box scores 0 on accuracy, so its groups are all-equal and GRPO has nothing
    to learn from; this reward tells boxed answers apart from unboxed ones.
    """
    return [float(bool(last_boxed(c))) for c in completions]


def math_task(
    path: str,
    columns: dict[str, str] | None = None,
    eval_path: str | None = None,
    n_eval: int = 100,
    split: str | None = None,
    eval_split: str | None = None,
    prompt_template: str = MATH_PROMPT_TEMPLATE,
    system_prompt: str | None = None,
    seed: int = 0,
) -> Task:
    """A math task over a user's file: rows need a ``prompt`` (or ``messages``) and an ``answer``.

    Args:
        path: ``.jsonl``, ``.parquet`` or a ``datasets`` directory.
        columns: task column -> file column, e.g. ``{"prompt": "problem", "answer": "solution"}``.
        eval_path: held-out file; without it, ``n_eval`` rows of ``path`` are held out.
        split, eval_split: splits of a saved ``DatasetDict``.
        prompt_template: user message, a ``str.format`` template over the row's columns.
        system_prompt: optional system message.
        seed: shuffle seed for the held-out rows.
    """
    rows = load_task_rows(path, columns, split, prompt_template, system_prompt)
    if eval_path is not None:
        train = rows
        eval_rows = load_task_rows(eval_path, columns, eval_split, prompt_template, system_prompt)
    else:
        train, eval_rows = split_rows(rows, n_eval, seed)
    for source, part in ((path, train), (eval_path or path, eval_rows)):
        check_column(
            part,
            "answer",
            str(source),
            lambda v: isinstance(v, (str, int, float)) and str(v).strip() != "",
            "a non-empty answer (string or number)",
        )
    return Task(
        name=f"math:{Path(path).name}",
        train=train,
        eval=eval_rows,
        reward_funcs=[math_accuracy],
        reward_weights=[1.0],
        accuracy_func=math_accuracy,
    )
