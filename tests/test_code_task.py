"""Code task: extraction, per-test results in the sandbox, HumanEval, MBPP-style files."""

import json

import pytest

from packrl.tasks.code import (
    code_pass_all,
    code_pass_fraction,
    code_task,
    extract_code,
    humaneval_rows,
    run_tests,
)

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def test_extract_code():
    text = "Here:\n```python\ndef f(x):\n    return x\n```\nUsage:\n```python\nprint(f(1))\n```"
    assert extract_code(text, "f") == "def f(x):\n    return x\n"  # the block defining f
    assert extract_code(text) == "print(f(1))\n"  # no entry point: the last block
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```js\nlet x = 1\n```") is None
    assert extract_code("```python\ndef f(x):\n    return x\n") is None  # truncated: no credit
    assert extract_code("def f(x): return x") is None


def test_fraction_and_all_or_nothing():
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    half = "```python\ndef add(a, b):\n    return a + b if a > 0 else 7\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    completions = [right, half, wrong, "no code"]
    tests = [ADD_TESTS] * 4
    assert code_pass_fraction(completions, tests) == [1.0, 2 / 3, 0.0, 0.0]
    assert code_pass_all(completions, tests) == [1.0, 0.0, 0.0, 0.0]


def test_a_hanging_test_fails_alone():
    solution = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n"
    assert run_tests(solution, ADD_TESTS, test_timeout_s=1.0) == [True, False, True]


def test_stop_on_fail_for_all_or_nothing():
    solution = "def add(a, b):\n    return a + b if a > 0 else 7\n"
    assert run_tests(solution, ADD_TESTS[1:] + ADD_TESTS[:1]) == [False, True, True]
    assert run_tests(solution, ADD_TESTS[1:] + ADD_TESTS[:1], stop_on_fail=True) == [False] * 3


def test_test_timeout_from_config():
    task = code_task(n_eval=4, test_timeout_s=0.5, scoring="all")
    assert task.reward_funcs[0].func is code_pass_all
    assert task.reward_funcs[0].keywords == {"test_timeout_s": 0.5}
    assert task.accuracy_func.keywords == {"test_timeout_s": 0.5}


def test_early_exit_and_fake_output_do_not_pass():
    for cheat in (
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "print('PASS')\nimport os\nos._exit(0)",
        "raise SystemExit(0)",
    ):
        assert run_tests(cheat, ADD_TESTS) == [False, False, False], cheat
    # Output of the tests themselves cannot forge the harness's report lines.
    forger = "import sys\nfor i in range(3):\n    print('OK-x', i, 'PASS')\ndef add(a, b):\n    return 99\n"
    assert run_tests(forger, ADD_TESTS) == [False, False, False]


def test_humaneval_rows_and_sample():
    rows = humaneval_rows()
    assert len(rows) == 164
    assert sum(len(r["tests"]) for r in rows) > 164  # check() split into one test per assert
    for r in rows[:4]:  # a quick sample; all 164 run in the slow test below
        args = (r["tests"], r["preamble"])
        ep = r["entry_point"]
        assert all(run_tests(r["canonical_solution"], *args, entry_point=ep)), r["task_id"]
        stub = f"def {ep}(*args, **kwargs):\n    return None\n"
        assert not any(run_tests(stub, *args, entry_point=ep)), r["task_id"]


def test_code_task_humaneval_split():
    task = code_task(n_eval=20, seed=1, scoring="all")
    assert len(task.train) == 144 and len(task.eval) == 20
    assert not {r["task_id"] for r in task.train} & {r["task_id"] for r in task.eval}
    assert task.reward_funcs == [code_pass_all]
    row = task.eval[0]
    completion = f"```python\n{row['canonical_solution']}\n```"
    cols = {k: [row[k]] for k in ("tests", "preamble", "entry_point")}
    assert task.accuracy_func(prompts=[row["messages"]], completions=[completion], **cols) == [1.0]
    with pytest.raises(ValueError, match="scoring='some'"):
        code_task(scoring="some")


def test_mbpp_style_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    rows = [
        {
            "text": f"Write add{i}.",
            "test_list": [f"assert add{i}(1, 1) == 2"],
            "test_setup_code": "",
        }
        for i in range(5)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cols = {"prompt": "text", "tests": "test_list", "preamble": "test_setup_code"}
    task = code_task(str(path), columns=cols, n_eval=1)
    assert len(task.train) == 4 and task.reward_funcs == [code_pass_fraction]
    row = task.train[0]
    assert "```python" in row["messages"][-1]["content"]
    name = row["tests"][0].split("(")[0].removeprefix("assert ")
    good = f"```python\ndef {name}(a, b):\n    return a + b\n```"
    assert code_pass_fraction([good], [row["tests"]], [row["preamble"]]) == [1.0]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "test_list": ["assert f(1) =="]}) + "\n")
    with pytest.raises(ValueError, match="row 0, test 0 is not valid Python"):
        code_task(str(bad), columns={"prompt": "text", "tests": "test_list"}, eval_path=str(bad))
    with pytest.raises(ValueError, match="no column 'tests_list'"):
        code_task(str(path), columns={"prompt": "text", "tests": "tests_list"})


@pytest.mark.slow
def test_humaneval_all_canonical_pass_and_stubs_pass_none():
    rows = humaneval_rows()
    canonical = [f"```python\n{r['canonical_solution']}\n```" for r in rows]
    stubs = [
        f"```python\ndef {r['entry_point']}(*args, **kwargs):\n    return None\n```" for r in rows
    ]
    cols = {k: [r[k] for r in rows] for k in ("tests", "preamble", "entry_point")}
    assert code_pass_all(canonical, **cols) == [1.0] * 164
    assert code_pass_all(stubs, **cols) == [0.0] * 164


# What crosses the process boundary between the tests and the solution
# (packrl/execution/code_harness.py): (solution, tests, expected per test).
BOUNDARY = {
    "plain-values": (
        "from fractions import Fraction\n"
        "def f(x, scale=1):\n"
        "    return [x * scale, (x,), {x: {x}}, frozenset([x]), b'x', 1j, Fraction(1, x), None]\n",
        [
            "assert f(2, scale=3) == [6, (2,), {2: {2}}, frozenset([2]), b'x', 1j, Fraction(1, 2), None]"
        ],
        [True],
    ),
    "subclasses-become-base-types": (
        "from collections import Counter, OrderedDict, namedtuple\n"
        "P = namedtuple('P', 'a b')\n"
        "def f(s):\n    return Counter(s), OrderedDict(a=1), P(1, 2), True\n",
        [
            "assert f('aab') == ({'a': 2, 'b': 1}, {'a': 1}, (1, 2), True)",
            "assert type(f('a')[0]) is dict",
        ],
        [True, True],
    ),
    "generators-and-objects": (
        "def squares(n):\n    yield from (i * i for i in range(n))\n"
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "def longest(pairs):\n    return max(p.b - p.a for p in pairs)\n",
        [
            "assert list(squares(4)) == [0, 1, 4, 9]",
            "assert longest([Pair(1, 5), Pair(2, 3)]) == 4",
            "assert Pair(1, 2).b == 2 and len(list(squares(3))) == 3",
        ],
        [True, True, True],
    ),
    "builtin-exceptions-keep-their-type": (
        "def f(x):\n    raise ValueError('bad x')\n",
        [
            "try:\n    f(1)\nexcept ValueError as e:\n    assert 'bad x' in str(e)\nelse:\n    assert False"
        ],
        [True],
    ),
    "solution-imports-used-by-tests": (
        "import math\ndef area(r):\n    return math.pi * r * r\n",
        ["assert math.isclose(area(1), 3.14159, rel_tol=1e-3)"],
        [True],
    ),
    # Documented limit: arguments are copies, so in-place changes are not seen.
    "in-place-changes-are-not-seen": (
        "def sort_in_place(xs):\n    xs.sort()\n",
        ["xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]"],
        [False],
    ),
    # Documented limit: functions cannot be passed to the solution.
    "functions-cannot-be-passed": (
        "def apply(fn, x):\n    return fn(x)\n",
        ["assert apply(lambda v: v + 1, 1) == 2"],
        [False],
    ),
}


@pytest.mark.parametrize("name", list(BOUNDARY))
def test_process_boundary(name):
    solution, tests, expected = BOUNDARY[name]
    assert run_tests(solution, tests) == expected
