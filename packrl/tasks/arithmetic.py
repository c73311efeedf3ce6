"""Generated arithmetic and algebra problems at graded difficulty (the CPU demo's task).

Problems are deterministic by seed, train and eval never share a question, and every
answer is checked by ``packrl.tasks.math.math_accuracy`` (math-verify), so the model must
put its final answer in ``\\boxed{}`` (or an ``<answer>`` tag, or an "answer is" line).

Difficulty levels (``LEVELS`` holds one generator per level):

    0  one-digit addition                      What is 3 + 5?
    1  two-digit addition (the CPU demo)       What is 47 + 38?
    2  two-digit addition and subtraction      What is 23 - 58?
    3  three-digit +/-, two-digit x one-digit  What is 47 * 8?
    4  two-digit x two-digit, exact division   What is 912 / 24?
    5  three operands with parentheses         What is (12 + 7) * 3 - 5?
    6  linear equation, integer solution       Solve for x: 3x + 7 = 22.
    7  linear equation, fraction solution      Solve for x: 4x - 3 = 6.
    8  quadratic with integer roots            What is the larger root of x^2 - 5x + 6 = 0?
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from packrl.tasks.base import Row, Task
from packrl.tasks.math import completion_text, extract_answer, math_accuracy
from packrl.tasks.shaping import prompt_opens_think

INSTRUCTION = "Put your final answer in \\boxed{}."


# An operator between a digit and a number: "17 + 23", "47 * 8", "912 / 24", "2\\times 3".
_UNEVALUATED = re.compile(r"\d\s*(?:[-+*/^x\u00d7\u00f7]|\\times|\\cdot|\\div)\s*[\d(\\]")


def arithmetic_accuracy(
    completions: Sequence[Any],
    answer: Sequence[str],
    prompts: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Reward: ``math_accuracy``, but 0.0 when the final answer is still an expression.

    math-verify evaluates "\\boxed{17 + 23}" to 40, so copying the question into the box
    would score; a trained model finds that in a few steps. "17 + 23 = 40" still counts
    (only the part after the last "=" must be a plain value). The final answer is the one
    ``math_accuracy`` grades (``packrl.tasks.math.extract_answer``).
    """
    rewards = math_accuracy(completions, answer, prompts=prompts, **kwargs)
    for i, completion in enumerate(completions):
        opened = prompts is not None and prompt_opens_think(prompts[i])
        final = extract_answer(completion_text(completion), opened) or ""
        final = final.rsplit("=", 1)[-1]
        if _UNEVALUATED.search(final):
            rewards[i] = 0.0
    return rewards


def _signed(k: int, var: str = "") -> str:
    """'+ 3x' / '- 3x' for a term after the first."""
    return f"+ {k}{var}" if k >= 0 else f"- {-k}{var}"


def _level0(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", str(a + b)


def _level1(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _level2(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b)
    return f"What is {a} - {b}?", str(a - b)


def _level3(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return f"What is {a} + {b}?", str(a + b)
    if kind == 1:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return f"What is {a} - {b}?", str(a - b)
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"What is {a} * {b}?", str(a * b)


def _level4(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} * {b}?", str(a * b)
    q, b = rng.randint(10, 99), rng.randint(2, 29)
    return f"What is {q * b} / {b}?", str(q)


def _level5(rng: random.Random) -> tuple[str, str]:
    a, b, c, d = (rng.randint(2, 20) for _ in range(4))
    op1, op2 = rng.choice("+-"), rng.choice("+-")
    inner = a + b if op1 == "+" else a - b
    value = inner * c + d if op2 == "+" else inner * c - d
    return f"What is ({a} {op1} {b}) * {c} {op2} {d}?", str(value)


def _linear(rng: random.Random, x: Fraction) -> tuple[str, str]:
    a = rng.choice([k for k in range(-9, 10) if k not in (0, 1)])
    b = rng.choice([k for k in range(-20, 21) if k != 0])
    c = a * x + b
    x_str = (
        str(x.numerator) if x.denominator == 1 else f"\\frac{{{x.numerator}}}{{{x.denominator}}}"
    )
    return f"Solve for x: {a}x {_signed(b)} = {c}.", x_str


def _level6(rng: random.Random) -> tuple[str, str]:
    return _linear(rng, Fraction(rng.randint(-12, 12)))


def _level7(rng: random.Random) -> tuple[str, str]:
    # a*x + b = c with integer c, a non-integer x: pick a and an integer c - b not divisible by a.
    a = rng.choice([k for k in range(2, 10)])
    num = rng.choice([k for k in range(-30, 31) if k % a != 0])
    sign = rng.choice([1, -1])
    b = rng.choice([k for k in range(-20, 21) if k != 0])
    question = f"Solve for x: {sign * a}x {_signed(b)} = {num + b}."
    x = Fraction(num, sign * a)
    sign_str = "-" if x < 0 else ""
    return question, f"{sign_str}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def _level8(rng: random.Random) -> tuple[str, str]:
    r1, r2 = rng.sample(range(-12, 13), 2)
    b, c = -(r1 + r2), r1 * r2  # (x - r1)(x - r2) = x^2 + bx + c
    terms = "x^2"
    if b:
        terms += f" {_signed(b, 'x')}".replace(" 1x", " x")
    if c:
        terms += f" {_signed(c)}"
    return f"What is the larger root of {terms} = 0?", str(max(r1, r2))


LEVELS: list[Callable[[random.Random], tuple[str, str]]] = [
    _level0,
    _level1,
    _level2,
    _level3,
    _level4,
    _level5,
    _level6,
    _level7,
    _level8,
]


def generate_problems(n: int, difficulty: int | Sequence[int], seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs; a list of levels mixes them uniformly."""
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    for level in levels:
        if not isinstance(level, int) or not 0 <= level < len(LEVELS):
            raise ValueError(
                f"difficulty {level!r}: use a level 0..{len(LEVELS) - 1} "
                "(see packrl.tasks.arithmetic)"
            )
    rng = random.Random(seed)
    problems: dict[str, str] = {}
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(
                f"difficulty {difficulty}: found only {len(problems)} distinct problems, "
                f"{n} asked for (train + eval); ask for fewer or use a harder level"
            )
        question, answer = LEVELS[rng.choice(levels)](rng)
        problems.setdefault(question, answer)
    return list(problems.items())


def arithmetic_task(
    n_train: int = 2000,
    n_eval: int = 100,
    difficulty: int | Sequence[int] = 1,
    seed: int = 0,
    system_prompt: str | None = None,
) -> Task:
    """Generated arithmetic/algebra task; rows have "messages", "answer" and "difficulty".

    Reward: ``arithmetic_accuracy`` (weight 1.0), also the accuracy.

    Args:
        n_train, n_eval: number of distinct problems in each split (never overlapping).
        difficulty: a level 0..8 (see module docstring) or a list of levels to mix.
        seed: generator seed; the same arguments give the same problems.
        system_prompt: optional system message (None: the chat template's default).
    """
    if n_train < 1 or n_eval < 0:
        raise ValueError(f"n_train={n_train}, n_eval={n_eval}: need n_train >= 1, n_eval >= 0")
    problems = generate_problems(n_train + n_eval, difficulty, seed)

    def row(question: str, answer: str) -> Row:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": f"{question} {INSTRUCTION}"})
        return {"messages": messages, "answer": answer, "difficulty": str(difficulty)}

    rows = [row(q, a) for q, a in problems]
    return Task(
        name=f"arithmetic-{difficulty}",
        train=rows[n_eval:],
        eval=rows[:n_eval],
        # Correctness only. A format bonus for any box (packrl.tasks.math.boxed_format, 0.2)
        # was gamed: under per-group std scaling a group that differs only in boxing gets
        # advantages as large as one that differs in being right, and SmolLM2 learned to box
        # operands, "None" or "22 + 55" without adding. Without it the demo learns more
        # (four seeds: 50/44/40/26% greedy at step 10, against 28/44/6/0%; docs/benchmarks.md).
        reward_funcs=[arithmetic_accuracy],
        reward_weights=[1.0],
        accuracy_func=arithmetic_accuracy,
    )
