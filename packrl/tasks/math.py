"""Math: final-answer extraction, the math-verify correctness reward, and ``math_task``.

What is graded, in this order (``extract_answer``); each step sees what the one before left:

1. Reasoning. Only the text after the last ``</think>`` (or ``</thinking>``) is graded. A
   reasoning block that never closes (an opening tag after the last closing one, or a prompt
   that ends inside ``<think>`` and a completion with no closing tag) means the completion
   was cut off while thinking: no answer, 0.
2. ``<answer>...</answer>``. If the graded text has a closed tag, the last one holds the
   answer (a box inside it wins over the rest of its text); boxes outside it are reasoning.
3. Boxes. Else the last group of ``\\boxed`` / ``\\fbox``: the last box and the boxes before
   it that only list parts of one answer with it (joined by "," ";" "and" "or", math
   delimiters, ``\\text{and}`` or an "x =" naming the next part). So
   "\\boxed{2} and \\boxed{3}" answers {2, 3}, never just 3, while "\\boxed{5}. No: \\boxed{7}"
   answers 7. (math-verify's own rule, ``extract_boxed_content``, also joins any two boxes
   less than 10 characters apart, so a corrected answer would become the set {5, 7}.) A box
   without braces (``\\boxed 5``, ``$\\boxed 7$``) runs to the end of its math environment,
   line or sentence, as math-verify reads it to the end of the text. A final box that never
   closes is no answer (the completion was cut off).
4. Else the text after the last "answer is" / "answer:" on its line, up to the end of its
   sentence (". ", ";", or ", " before a word: "(1, 2)" stays whole).
5. Else there is no stated answer: 0. So is an answer over ``MAX_ANSWER_CHARS``.

The answer is then checked against the gold answer with math-verify, gold first
(``verify(gold, prediction)``). Both are parsed as LaTeX first and as plain expressions
second, so a gold answer written as ``85``, ``3/4`` or ``x = 2`` still scores (parsing the
gold as LaTeX only is a common way to score every answer 0). A side that parses to no
expression, only math-verify's string fallback, counts as unparsed: for a gold answer that is
a data error (``check_gold_answer``), for a prediction a 0.

Numbers (``numbers_match``): math-verify rounds decimals to 6 places and chops differences
below 1e-15, so 0.0000002 = 0.0000001 = -0.0000001 and 1/2^98 = 1/2^99 there. packrl
replaces that one comparison (``math_verify.grader.sympy_numeric_eq``, used for plain
numbers and for every number inside tuples, sets, intervals, equations and matrices):

- exact values (integers, fractions, radicals, pi) must be equal: computed to 50 digits they
  must agree to 1e-40, relative;
- when either side is a decimal, ``|pred - gold| <= REL_TOL * |gold|`` (``math.isclose``'s
  relative test, measured against the gold) with ``REL_TOL = 1e-5``: an answer right to 6
  significant digits matches (rounding to 6 digits errs by at most 5e-6), one off by more
  than 1e-5 of the gold does not; a gold 0 needs exactly 0, and the sign always counts;
- but a gold integer must be met exactly (``85.0`` = 85, ``123457.0`` != 123456): an integer
  has no rounding to forgive, and a tolerance there would pay a policy that writes decimals
  for off-by-one answers.

Percent signs and everything that is not a plain number are left to math-verify.

math-verify can hang in C code on inputs such as ``10^{10^{10}}``, and its own timeouts use
``signal.alarm``, which only works in a main thread. So checks run in the main thread of
worker processes (``packrl.execution.workers``) with a hard outer deadline. Keep torch out of
this module: the workers import it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from packrl.execution.workers import shared_pool
from packrl.tasks.base import Row, Task, completion_text
from packrl.tasks.data import check_column, load_task_rows, split_rows
from packrl.tasks.shaping import prompt_opens_think

log = logging.getLogger(__name__)

# Seconds: math-verify's own (alarm-based) limits inside the worker, and the hard outer
# deadline after which the worker is killed and the sample scores 0.
PARSE_TIMEOUT_S = 2
VERIFY_TIMEOUT_S = 2
DEADLINE_S = 5.0
# A final answer longer than this is not an answer; skipping it keeps junk out of sympy.
MAX_ANSWER_CHARS = 1000
# Relative tolerance for decimals (see the module docstring for why 1e-5).
REL_TOL = 1e-5
# Exact values are compared at this many digits and must agree to EXACT_REL_TOL.
_EXACT_DIGITS = 50
EXACT_REL_TOL = 1e-40

_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
# A box without braces ("\\boxed 5"): its argument runs to the end of its math environment,
# line or sentence, or to the next box.
_UNBRACED_BOX = re.compile(r"\\(boxed|fbox)(?![A-Za-z])[ \t]*(?=[^{\s])")
_UNBRACED_TAIL = re.compile(r"(?:\s+(?:and|or))?[\s.,;]*$")
_UNBRACED_END = re.compile(r"\$|\n|\\[])]|\\(?:boxed|fbox)(?![A-Za-z])|[.;]\s|,\s+(?=[A-Za-z]{2,})")
# What may stand between two boxes of one answer, once math delimiters and \\text{} are gone:
# a list separator, then a "x =" that names the next part ("$x=\\boxed{-1}$ and $x=\\boxed{4}$").
_MATH_MARKUP = re.compile(r"\$|\\[][()]|\\[,;:!]|\\q?quad\b|\\text\{([^{}]*)\}")
_LIST_SEPARATOR = re.compile(
    r"\s*(?:[,;]\s*)?(?:(?:and|or)\s*)?(?:[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?", re.IGNORECASE
)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
# An "answer is" sentence ends at ". ", ";" or ", " + a word (not at "3.5" or "(1, 2)").
_SENTENCE_END = re.compile(r"[.;]\s|;|,\s+(?=[A-Za-z]{2,})")


def graded_text(completion: str, think_opened: bool = False) -> str | None:
    """The text after the completion's last reasoning block; None if a block never closes.

    ``think_opened``: the prompt ended inside ``<think>``, so the completion starts in it.
    """
    closes = list(_THINK_CLOSE.finditer(completion))
    if not closes:
        return None if think_opened or _THINK_OPEN.search(completion) else completion
    rest = completion[closes[-1].end() :]
    return None if _THINK_OPEN.search(rest) else rest


def _close_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``open_at``, or None if it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of each closed braced box; a box that never closes ends the list."""
    out = []
    for m in _BOX.finditer(text):
        if not text.startswith("{", m.end()):
            continue
        end = _close_brace(text, m.end())
        if end is None:
            break
        out.append((m.start(), end + 1, text[m.end() + 1 : end].strip()))
    return out


def _joined(between: str) -> bool:
    """True if the text between two boxes only lists them: "and", ",", "$ or $x=" ..."""
    return _LIST_SEPARATOR.fullmatch(_MATH_MARKUP.sub(r"\1", between)) is not None


def _brace_unbraced(text: str) -> str:
    """``\\boxed 5`` -> ``\\boxed{5}`` (see ``_UNBRACED_END`` for where the argument ends)."""
    out, pos = [], 0
    for m in _UNBRACED_BOX.finditer(text):
        if m.start() < pos:  # inside the argument of the box before
            continue
        end = _UNBRACED_END.search(text, m.end())
        stop = end.start() if end else len(text)
        arg = text[m.end() : stop]
        kept = _UNBRACED_TAIL.sub("", arg)  # "\\boxed 5 and \\boxed 6": " and " is not in the box
        out.append(f"{text[pos : m.start()]}\\{m[1]}{{{kept}}}{arg[len(kept) :]}")
        pos = stop
    return "".join(out) + text[pos:]


def final_boxed(text: str) -> str | None:
    """The last group of boxes in ``text`` (module docstring, step 3), or None.

    Several boxes come back joined by ", " ("2, 3"), which math-verify reads as a set.
    """
    text = _brace_unbraced(text)
    boxes = _boxes(text)
    if not boxes or _BOX.search(text, boxes[-1][1]):  # none, or the final one is cut off
        return None
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        if not _joined(text[box[1] : group[0][0]]):
            break
        group.insert(0, box)
    parts = [content for _, _, content in group]
    return ", ".join(parts) if all(parts) else None  # an empty box is no answer


def extract_answer(completion: str, think_opened: bool = False) -> str | None:
    """The final answer stated in ``completion``, or None (the module docstring's order)."""
    text = graded_text(completion, think_opened)
    if text is None:
        return None
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return final_boxed(tags[-1]) or tags[-1].strip() or None
    if _BOX.search(text):
        return final_boxed(text)
    found = None
    for line in text.splitlines():
        for m in _ANSWER_IS.finditer(line):
            found = line[m.end() :]
    if found is None:
        return None
    found = _SENTENCE_END.split(found + " ", maxsplit=1)[0]
    # "The answer is **85**." -> "85"; "$85$" is kept (LaTeX parsing handles the dollars).
    found = found.strip().strip("*. ")
    return found or None


def numbers_match(gold: Any, pred: Any, float_rounding: int, numeric_precision: int) -> bool:
    """math-verify's numeric comparison with packrl's tolerance (module docstring, "Numbers").

    Installed in place of ``math_verify.grader.sympy_numeric_eq`` (same signature; the two
    precision arguments are math-verify's and are used only where it decides). Matrices,
    expressions with variables, and exact atoms (where math-verify compares exactly and
    reads 9% as 9) go to math-verify's own function.
    """
    import sympy

    def plain_number(x: Any) -> bool:
        return isinstance(x, sympy.Expr) and bool(x.is_number)

    if not (plain_number(gold) and plain_number(pred)):
        return _MV_NUMERIC_EQ(gold, pred, float_rounding, numeric_precision)
    decimal = gold.has(sympy.Float) or pred.has(sympy.Float)
    if not decimal and (gold.is_Atom or pred.is_Atom or gold.has(sympy.UnevaluatedExpr)):
        return _MV_NUMERIC_EQ(gold, pred, float_rounding, numeric_precision)
    g = sympy.N(gold.doit(), _EXACT_DIGITS)
    p = sympy.N(pred.doit(), _EXACT_DIGITS)
    if not decimal:
        tol = EXACT_REL_TOL
    elif gold.doit().is_Integer:
        tol = 0.0
    else:
        tol = REL_TOL
    return bool(abs(p - g) <= tol * abs(g))


_MV_NUMERIC_EQ: Any = None


def _install_tolerance() -> None:
    """Puts ``numbers_match`` in place of math-verify's numeric comparison (once)."""
    global _MV_NUMERIC_EQ
    from math_verify import grader

    if _MV_NUMERIC_EQ is None:
        _MV_NUMERIC_EQ = grader.sympy_numeric_eq
        grader.sympy_numeric_eq = numbers_match


def _parse(text: str) -> list:
    """math-verify's parse of ``text``: LaTeX, else plain; [] if neither gives an expression."""
    from math_verify import parse
    from sympy import Basic, MatrixBase

    # LaTeX wrapped in $...$ so that unanchored forms like \sqrt{2} or \dfrac12 parse.
    for candidate in (f"${text}$", text):
        parsed = parse(candidate, parsing_timeout=PARSE_TIMEOUT_S)
        if any(isinstance(x, (Basic, MatrixBase)) for x in parsed):
            return parsed
    return []


def gold_problem(gold: str) -> str | None:
    """Why ``gold`` can never be matched, or None if it parses (runs math-verify: main thread)."""
    from sympy import Basic, nan, zoo

    if not str(gold).strip():
        return "it is empty"
    parsed = _parse(str(gold))
    if not parsed:
        return "math-verify parses it to no expression (as LaTeX or as plain text)"
    value = parsed[0]
    if isinstance(value, Basic) and value.has(nan, zoo):
        return f"it is undefined ({value}), so no answer can equal it"
    return None


def check_gold_answer(gold: str) -> str | None:
    """None if math-verify can read ``gold``, else why not (e.g. ``\\frac{``: unbalanced).

    Meant for start-up checks of a data set; runs in the shared worker pool, so it is safe
    from any thread. A check that passes ``DEADLINE_S`` reports that.
    """
    return check_gold_answers([gold])[0]


def check_gold_answers(golds: Sequence[Any]) -> list[str | None]:
    """``check_gold_answer`` for many answers at once (one pass over the worker pool)."""
    results = shared_pool().map(gold_problem, [(str(g),) for g in golds], timeout_s=DEADLINE_S)
    return [r.value if r.ok else f"checking it failed ({r.error})" for r in results]


def gold_answers_parse(rows: Sequence[Row]) -> list[str | None]:
    """A task's ``validate_rows``: why each row's ``answer`` cannot be graded, or None."""
    return [
        None if why is None else f"gold answer {str(r['answer'])!r} cannot be graded: {why}"
        for r, why in zip(rows, check_gold_answers([r["answer"] for r in rows]), strict=True)
    ]


def verify_answer(gold: str, answer: str) -> float:
    """1.0 if ``answer`` equals ``gold`` according to math-verify with packrl's tolerance.

    Runs math-verify directly: call it only in a main thread (as the workers do).

    Raises:
        ValueError: the gold answer cannot be parsed (a data error, see ``check_gold_answer``).
    """
    from math_verify import verify

    _install_tolerance()
    problem = gold_problem(gold)
    if problem is not None:
        raise ValueError(f"gold answer {gold!r} cannot be graded: {problem}")
    answer_parsed = _parse(answer)
    if not answer_parsed:
        return 0.0
    return float(verify(_parse(gold), answer_parsed, timeout_seconds=VERIFY_TIMEOUT_S))


def warm_up() -> None:
    """Imports math-verify and builds its parsers (the first parse takes about a second)."""
    verify_answer("\\frac{1}{2}", "0.5")


def math_accuracy(
    completions: Sequence[Any],
    answer: Sequence[Any],
    prompts: Sequence[Any] | None = None,
    deadline_s: float | None = None,
    **kwargs: Any,
) -> list[float]:
    """Reward: 1.0 when the completion's final answer matches the ``answer`` column, else 0.0.

    Completions are strings or TRL's message lists. A prompt that ends inside ``<think>``
    (an assistant prefill) makes the completion start inside a reasoning block. Checks run
    in the shared worker pool, each with a hard deadline (``DEADLINE_S``); a check that
    passes it scores 0. The whole batch ends within about ``deadline_s * ceil(N / workers)``.

    Raises:
        ValueError: a gold answer is empty or cannot be parsed (naming the sample).
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
        opened = prompts is not None and prompt_opens_think(prompts[i])
        pred = extract_answer(completion_text(completion), think_opened=opened)
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
                raise ValueError(f"math_accuracy: sample {i}: {res.error}")  # a data bug
            log.warning("math_accuracy: sample %d (answer %.60r) scored 0: %s", i, pred, res.error)
    return rewards


MATH_PROMPT_TEMPLATE = "{prompt}\n\nPut your final answer in \\boxed{{}}."


def boxed_format(
    completions: Sequence[Any], prompts: Sequence[Any] | None = None, **kwargs: Any
) -> list[float]:
    """Reward: 1.0 when the completion's graded text ends in a non-empty closed box, else 0.0.

    A small shaping term beside ``math_accuracy``: a small model that writes "44 + 21 = 65"
    without the box scores 0 on accuracy, so its groups are all-equal and GRPO has nothing
    to learn from; this reward tells boxed answers apart from unboxed ones. Boxes inside a
    reasoning block do not count.
    """
    out = []
    for i, completion in enumerate(completions):
        opened = prompts is not None and prompt_opens_think(prompts[i])
        text = graded_text(completion_text(completion), opened)
        out.append(float(text is not None and final_boxed(text) is not None))
    return out


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
        validate_rows=gold_answers_parse,
    )
