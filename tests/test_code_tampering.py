"""The code reward cannot be fooled from inside the solution.

Each row of ``TAMPERING`` is a wrong solution (``add`` returns ``a - b``) that also tries to
tamper with the test harness; it must score 0. The right solution to the same problem must
score 1 in the same call, so a harness that simply broke would fail these tests. The table is
copied into docs/sandbox.md.
"""

import pytest

from packrl.tasks.code import code_pass_all, code_pass_fraction

TESTS = ["assert add(1, 2) == 3", "assert add(2, 5) == 7", "assert add(-4, 4) == 0"]
WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"
# Finds the run's report token in the harness's program file, as the old harness allowed.
STEAL_TOKEN = (
    "import os, re\n"
    "try:\n"
    "    token = re.search(r'OK-[0-9a-f]{32}', open('/tmp/main.py').read()).group(0).encode()\n"
    "except Exception:\n"
    "    token = b'PASS'\n"
)
# Writes a forged success report into every file descriptor it has (the report pipe among
# them, in the old harness), then into every descriptor of every other process it can open
# through /proc.
FORGE_EVERYWHERE = (
    "import os\n"
    "def forge(data):\n"
    "    for fd in range(64):\n"
    "        try:\n"
    "            os.write(fd, data)\n"
    "        except OSError:\n"
    "            pass\n"
    "def forge_others(data):\n"
    "    for pid in os.listdir('/proc'):\n"
    "        if pid.isdigit() and int(pid) != os.getpid():\n"
    "            try:\n"
    "                fds = os.listdir(f'/proc/{pid}/fd')\n"
    "            except OSError:\n"
    "                continue\n"
    "            for fd in fds:\n"
    "                try:\n"
    "                    with open(f'/proc/{pid}/fd/{fd}', 'wb') as f:\n"
    "                        f.write(data)\n"
    "                except OSError:\n"
    "                    pass\n"
)

# (id, tampering wrong solution, tests, preamble[, right solution if not RIGHT])
TAMPERING = [
    (
        "builtins-exec-noop",
        "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "builtins-compile-to-pass",
        "import builtins\n_c = builtins.compile\n"
        "builtins.compile = lambda src, name, mode, *a, **k: _c('pass', name, mode)\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "assertionerror-replaced",
        "import builtins\nclass Nothing(BaseException):\n    pass\n"
        "builtins.AssertionError = Nothing\nbuiltins.BaseException = Nothing\n"
        "builtins.Exception = Nothing\n" + WRONG,
        TESTS,
        "",
    ),
    ("sys-exit-0", "import sys\nsys.exit(0)\n" + WRONG, TESTS, ""),
    ("os-_exit-0", "import os\nos._exit(0)\n" + WRONG, TESTS, ""),
    (
        "systemexit-in-atexit",
        "import atexit\ndef bye():\n    raise SystemExit(0)\natexit.register(bye)\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "exit-0-from-add",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        TESTS,
        "",
    ),
    (
        "fork-parent-exits-0",
        "import os, time\nif os.fork():\n    os._exit(0)\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "print-forged-report",
        STEAL_TOKEN + "for i in range(3):\n    print(token.decode(), i, 'PASS', flush=True)\n"
        "print('PASS')\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "steal-token-write-every-fd",
        STEAL_TOKEN + FORGE_EVERYWHERE + "forge(token)\nos._exit(0)\n",
        TESTS,
        "",
    ),
    (
        "forge-into-other-processes",
        STEAL_TOKEN + FORGE_EVERYWHERE + "forge_others(token)\nforge_others(b'PASS')\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "forge-from-inside-add",
        STEAL_TOKEN + FORGE_EVERYWHERE + "def add(a, b):\n    forge(token)\n    os._exit(0)\n",
        TESTS,
        "",
    ),
    (
        "thread-spamming-pass",
        FORGE_EVERYWHERE + "import threading, time\n"
        "def spam():\n    while True:\n        forge(b'PASS')\n        time.sleep(0.01)\n"
        "threading.Thread(target=spam, daemon=True).start()\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "os-write-patched",
        "import os\n_w = os.write\nos.write = lambda fd, data: _w(fd, b'PASS')\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "sys-modules-os-replaced",
        "import sys, types\nfake = types.ModuleType('os')\nfake.write = lambda fd, d: 4\n"
        "fake._exit = lambda code: None\nsys.modules['os'] = fake\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "harness-module-patched",
        "import sys\nmain = sys.modules['__main__']\n"
        "for name in list(vars(main)):\n"
        "    if callable(getattr(main, name)):\n"
        "        setattr(main, name, lambda *a, **k: None)\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "eq-always-true",
        "class Anything:\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Anything()\n",
        TESTS,
        "",
    ),
    (
        "int-subclass-eq-true",
        "class Int(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(a - b)\n",
        TESTS,
        "",
    ),
    (
        "test-helper-redefined",
        "def expected(a, b):\n    return a - b\n" + WRONG,
        ["assert add(1, 2) == expected(1, 2)", "assert add(5, 5) == expected(5, 5)"],
        "def expected(a, b):\n    return a + b\n",
    ),
    (
        "check-function-redefined",
        "def check(candidate):\n    pass\n" + WRONG,
        ["check(add)"],
        "def check(candidate):\n    assert candidate(1, 2) == 3\n",
    ),
    (
        "math-module-faked",
        "class FakeMath:\n    def isclose(self, *a, **k):\n        return True\n"
        "math = FakeMath()\n" + WRONG,
        ["assert math.isclose(add(1, 2), 3)"],
        "",
        "import math\n" + RIGHT,  # MBPP-style: the test relies on the solution's import
    ),
    (
        "builtin-abs-shadowed",
        "def abs(x):\n    return 0\n" + WRONG,
        ["assert abs(add(1, 2) - 3) < 1e-9"],
        "",
    ),
    (
        "module-planted-in-cwd",
        "open('textwrap.py', 'w').write("
        + repr(FORGE_EVERYWHERE + "forge(b'PASS')\nforge_others(b'PASS')\nos._exit(0)\n")
        + ")\n"
        + WRONG,
        ["import textwrap\nassert add(1, 2) == 3"],
        "",
    ),
    (
        "kill-everything",
        "import os, signal\nfor pid in range(1, 200):\n    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n" + WRONG,
        TESTS,
        "",
    ),
    (
        "ptrace-harness-memory",
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "for pid in range(1, 50):\n    libc.ptrace(16, pid, 0, 0)\n"  # PTRACE_ATTACH
        "for pid in range(1, 50):\n    try:\n"
        "        open(f'/proc/{pid}/mem', 'r+b').close()\n        print('opened', pid)\n"
        "    except OSError:\n        pass\n" + WRONG,
        TESTS,
        "",
    ),
]


def fenced(code: str) -> str:
    return f"```python\n{code}```"


@pytest.mark.parametrize(
    "solution,tests,preamble,right",
    [pytest.param(*row[1:4], (row[4:] or [RIGHT])[0], id=row[0]) for row in TAMPERING],
)
def test_tampering_scores_zero_and_the_right_solution_one(solution, tests, preamble, right):
    completions = [fenced(solution), fenced(right)]
    cols = {"tests": [tests] * 2, "preamble": [preamble] * 2, "entry_point": ["add"] * 2}
    assert code_pass_all(completions, **cols) == [0.0, 1.0]
    assert code_pass_fraction(completions[:1], **{k: v[:1] for k, v in cols.items()}) == [0.0]


def test_table_has_at_least_12_rows():
    assert len(TAMPERING) >= 12
