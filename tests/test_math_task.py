"""Math answer extraction, the math-verify reward in worker processes, and generated problems.

Issue 10 part 1: every listed input with its right value, adversarial completions, and
property tests for the kinds behind them (reasoning blocks, multi-part answers, the
tolerance at every scale).
"""

import time
from decimal import Decimal, getcontext
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrl.rewards import RewardScorer
from packrl.tasks.arithmetic import (
    INSTRUCTION,
    LEVELS,
    arithmetic_accuracy,
    arithmetic_task,
    generate_problems,
)
from packrl.tasks.math import (
    REL_TOL,
    boxed_format,
    check_gold_answer,
    extract_answer,
    math_accuracy,
    verify_answer,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so the sum is \\boxed{85}.", "85"),
        ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # last box wins
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces
        ("\\fbox{7}", "7"),
        ("<think>47+38</think><answer> 85 </answer>", "85"),
        ("<answer>\\boxed{12}</answer>", "12"),
        ("We add them.\nThe answer is **85**.", "85"),
        ("Final answer: 3/4", "3/4"),
        ("The answer is 3.5, since 7/2 = 3.5", "3.5"),
        ("The answer is 5. Wait, the answer is 6.", "6"),
        ("I think it's 85", None),
        ("", None),
        ("\\boxed{unclosed", None),
        ("\\boxed{}", None),
        ("\\boxed 5", "5"),  # no braces: to the end of the math environment, line or sentence
        ("$\\boxed 7$ and more", "7"),
        ("\\boxed 12. Done.", "12"),
        ("\\boxed{2} and \\boxed{3}", "2, 3"),  # one answer in several boxes
        ("$x=\\boxed{-1}$ and $x=\\boxed{4}$", "-1, 4"),
        ("\\boxed{} and \\boxed{3}", None),  # an empty part
        ("<think>\\boxed{5}</think>The answer is 7.", "7"),
        ("The answer is (1, 2).", "(1, 2)"),
        ("The answer is 3, because 1 + 2 = 3", "3"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_math_accuracy_forms():
    cases = [
        ("\\boxed{85}", "85", 1.0),  # boxed
        ("The answer is 85", "85", 1.0),  # plain text, gold not in LaTeX
        ("<answer>85</answer>", "85", 1.0),  # tagged
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),  # fraction vs decimal
        ("\\boxed{0.75}", "\\frac{3}{4}", 1.0),
        ("\\boxed{\\dfrac12}", "1/2", 1.0),  # LaTeX without $...$, gold as plain expression
        ("\\boxed{2^{1/2}}", "\\sqrt{2}", 1.0),
        ("\\boxed{x = 2}", "2", 1.0),
        ("\\boxed{86}", "85", 0.0),  # wrong
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{3}", 0.0),
        ("85", "85", 0.0),  # no stated final answer
        ("", "85", 0.0),  # empty output
    ]
    got = math_accuracy([c for c, _, _ in cases], [g for _, g, _ in cases])
    assert got == [r for _, _, r in cases]


def test_pathological_answer_ends_within_deadline():
    # Each check has a hard deadline: the worker is killed at it and the sample scores 0.
    math_accuracy(["\\boxed{1}"], ["1"])  # start the workers outside the timed part
    completions = ["\\boxed{10^{10^{10}}}", "\\boxed{9^{9^{9^{9}}}}"]  # one per worker
    start = time.monotonic()
    got = math_accuracy(completions, ["1", "1"], deadline_s=1.0)
    elapsed = time.monotonic() - start
    assert got == [0.0, 0.0]
    assert elapsed < 1.0 + 5.0, elapsed  # math-verify's own limits alone would take 2 s or more
    # The replaced workers score normally afterwards.
    assert math_accuracy(["\\boxed{85}", "\\boxed{84}"], ["85", "85"]) == [1.0, 0.0]


def test_bad_gold_is_loud():
    with pytest.raises(ValueError, match="sample 1 has an empty 'answer'"):
        math_accuracy(["\\boxed{1}", "\\boxed{2}"], ["1", " "])


def test_generator_is_deterministic_and_graded():
    for level in range(len(LEVELS)):
        a = generate_problems(50, level, seed=3)
        assert a == generate_problems(50, level, seed=3)
        assert a != generate_problems(50, level, seed=4)
        assert len({q for q, _ in a}) == 50
    assert generate_problems(5, 1, seed=0)[0][0].startswith("What is ")
    with pytest.raises(ValueError, match="difficulty 9"):
        generate_problems(5, 9, seed=0)
    with pytest.raises(ValueError, match="distinct problems"):
        generate_problems(101, 0, seed=0)  # one-digit addition has only 100


def test_generated_answers_are_correct():
    # The gold answers are the true values: evaluate the questions independently.
    for question, answer in generate_problems(200, [1, 2, 3, 4, 5], seed=0):
        expr = question.removeprefix("What is ").removesuffix("?")
        assert eval(expr) == int(answer), question  # noqa: S307 - our own generated text
    for question, answer in generate_problems(50, [6, 7], seed=0):
        lhs, rhs = question.removeprefix("Solve for x: ").rstrip(".").split(" = ")
        a, b = lhs.split("x")
        from fractions import Fraction

        num = answer.replace("\\frac{", "").replace("}{", "/").replace("}", "")
        x = Fraction(num)
        assert int(a) * x + int(b.replace(" ", "")) == int(rhs), question


def test_arithmetic_task_rows_and_reward():
    task = arithmetic_task(n_train=300, n_eval=50, difficulty=1, seed=0)
    assert len(task.train) == 300 and len(task.eval) == 50
    train_q = {r["messages"][-1]["content"] for r in task.train}
    eval_q = {r["messages"][-1]["content"] for r in task.eval}
    assert not train_q & eval_q
    user = task.train[0]["messages"][-1]
    assert user["role"] == "user" and "\\boxed{}" in user["content"]
    assert task.accuracy_func is arithmetic_accuracy
    assert task.reward_funcs == [arithmetic_accuracy]
    assert task.reward_weights == [1.0]
    rows = task.eval[:4]
    completions = [f"\\boxed{{{r['answer']}}}" for r in rows[:2]] + ["\\boxed{0}", "no idea"]
    assert task.accuracy_func(
        prompts=[r["messages"] for r in rows],
        completions=completions,
        answer=[r["answer"] for r in rows],
        difficulty=[r["difficulty"] for r in rows],
    ) == [1.0, 1.0, 0.0, 0.0]
    same = arithmetic_task(n_train=300, n_eval=50, difficulty=1, seed=0)
    assert same.train == task.train


def test_arithmetic_task_pays_nothing_for_a_lazy_box():
    """The kinds of box SmolLM2 wrote in the CPU demo (seed 3, steps 9-10) when the task also
    paid 0.2 for any non-empty box (docs/benchmarks.md), on one problem: none adds the numbers."""
    task = arithmetic_task(n_train=10, n_eval=0, difficulty=1, seed=0)
    lazy = [
        "\\boxed{14}",  # an operand
        "\\boxed{None}",
        "14 + 50 = \\boxed{None}",
        "\\boxed{14 + 50}",  # math-verify would evaluate the copy to 64
        "\\boxed{14+50}",
        "\\boxed{sixty-four}",
        "\\boxed{1.0f}",
        "\\boxed{14 + 50 = \\boxed{65}}",
        "\\boxed{[14 + 50]|\\boxed{[40] The answer is 40.}}",
        "\\boxed{}",
        "\\boxed{64",  # cut off
        "<think>\\boxed{64}</think>",  # only inside the reasoning
        "14 + 50 = 64",  # right, but no answer stated
    ]
    # Hedges: two values, one of them right; none is an answer.
    hedges = [
        "\\boxed{64, 65}",
        "\\boxed{64} or \\boxed{65}",
        "\\boxed{64}\\boxed{65}",
        "\\boxed{64 \\pm 1}",
        "\\boxed{[60, 70]}",
        "\\boxed{64 \\text{ or } 65}",
        "\\boxed{63 \\approx 64 \\approx 65}",
    ]
    right = ["14 + 50 = \\boxed{64}", "\\boxed{64}.", "The answer is 64."]
    completions = lazy + hedges + right
    n = len(completions)
    prompts = [[{"role": "user", "content": f"What is 14 + 50? {INSTRUCTION}"}]] * n
    scorer = RewardScorer(task.reward_funcs, task.reward_weights)  # as the recipe sums them
    totals = scorer(prompts, completions, {"answer": ["64"] * n}).total.tolist()
    assert totals == [0.0] * (len(lazy) + len(hedges)) + [1.0] * len(right)
    # The format bonus the task used to add paid for 9 of the lazy completions.
    assert sum(boxed_format(completions=lazy)) == 9


def test_boxed_format():
    completions = ["44 + 21 = 65. \\boxed{65}.", "\\boxed{}", "44 + 21 = 65", "**65**", "\\boxed{6"]
    assert boxed_format(completions=completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # Only the graded text counts: a box inside a reasoning block, or in one never closed, is not.
    more = [
        "<think>\\boxed{5}</think>65",
        "<think>\\boxed{65}",
        "\\boxed 65",
        "<think></think>\\boxed{65}",
    ]
    assert boxed_format(completions=more) == [0.0, 0.0, 1.0, 1.0]


def test_arithmetic_accuracy_rejects_unevaluated_expressions():
    # math-verify scores "\boxed{17 + 23}" as 40; a policy learned to copy the question.
    completions = [
        "\\boxed{17 + 23}",
        "\\boxed{2\\times 20}",
        "\\boxed{17 + 23 = 40}",
        "\\boxed{40}.",
        "\\boxed{17 + 23 = 41}",
    ]
    assert math_accuracy(completions, ["40"] * 5) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert arithmetic_accuracy(completions, ["40"] * 5) == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert arithmetic_accuracy(["\\boxed{-\\frac{3}{4}}"], ["-\\frac{3}{4}"]) == [1.0]
    # The same final answer math_accuracy grades: TRL message completions, reasoning blocks.
    messages = [[{"role": "assistant", "content": c}] for c in ("\\boxed{17 + 23}", "\\boxed{40}")]
    assert arithmetic_accuracy(messages, ["40"] * 2) == [0.0, 1.0]
    assert arithmetic_accuracy(["<think>\\boxed{40}</think>\\boxed{17 + 23}"], ["40"]) == [0.0]
    assert arithmetic_accuracy(["<think>\\boxed{17 + 23}</think>\\boxed{40}"], ["40"]) == [1.0]


# --- issue 10: every listed input, with its right value ---------------------------------
ISSUE_10_CASES = [
    # the documented grading order: only the text after the reasoning block is graded
    ("<think>maybe \\boxed{5}? no.</think><answer>7</answer>", "7", 1.0),
    ("<think>maybe \\boxed{5}? no.</think><answer>7</answer>", "5", 0.0),
    # boxes without braces
    ("\\boxed 5", "5", 1.0),
    ("$\\boxed 7$", "7", 1.0),
    # multi-part answers are not cut to one part
    ("The roots are \\boxed{2} and \\boxed{3}.", "2, 3", 1.0),
    ("$x=\\boxed{-1}$ and $x=\\boxed{4}$", "-1, 4", 1.0),
    ("The answer is (1, 2).", "(1, 2)", 1.0),
    # relative tolerance, and the sign counts (math-verify's 6-decimal rounding: all 1.0)
    ("\\boxed{0.0000002}", "0.0000001", 0.0),
    ("\\boxed{-0.0000001}", "0.0000001", 0.0),
    ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", 0.0),
    # a reasoning block that never closes: cut off, no answer
    ("<think>47 + 38 is \\boxed{85}", "85", 0.0),
]


@pytest.mark.parametrize("completion, gold, reward", ISSUE_10_CASES)
def test_issue_10_inputs(completion, gold, reward):
    assert math_accuracy([completion], [gold]) == [reward]


# What a lazy or malicious policy would write, with the right value.
ADVERSARIAL = [
    ("\\boxed{5} or \\boxed{7}", "7", 0.0),  # a hedge is a set {5, 7}, not 7
    ("\\boxed{5}, \\boxed{7}", "5", 0.0),
    ("\\boxed{2}", "2, 3", 0.0),  # one part of two
    ("\\boxed{2}, \\boxed{3}, \\boxed{4}", "2, 3", 0.0),  # every candidate listed
    ("\\boxed{2, 3, 4}", "2, 3", 0.0),
    ("\\boxed{5}. No, wait: \\boxed{7}", "7", 1.0),  # a correction: the last box is final
    ("\\boxed{5}. No, wait: \\boxed{7}", "5", 0.0),
    ("\\boxed{85} ... \\boxed{8", "85", 0.0),  # cut off inside the final box
    ("\\boxed{85} ... \\boxed{8", "8", 0.0),
    ("<think>\\boxed{85}</think>", "85", 0.0),  # the answer only inside the reasoning
    ("<think>a</think>\\boxed{85}<think>b", "85", 0.0),  # a second block never closes
    ("<think><answer>7</answer></think>\\boxed{5}", "7", 0.0),  # a tag in the reasoning
    ("<think><answer>7</answer></think>\\boxed{5}", "5", 1.0),
    ("\\boxed{5} <answer>7</answer>", "7", 1.0),  # the answer tag wins over boxes outside it
    ("<answer>\\boxed{5} then 6</answer>", "5", 1.0),  # a box inside the tag wins in it
    ("<answer></answer> \\boxed{5}", "5", 0.0),  # the declared answer is empty
    ("\\boxed{85.0}", "85", 1.0),  # an integer written as a decimal
    ("\\boxed{85.0000001}", "85", 0.0),  # an integer gold is met exactly
    ("\\boxed{123457.0}", "123456", 0.0),  # within 1e-5, but an off-by-one integer
    ("\\boxed{0.0}", "0", 1.0),
    ("\\boxed{0.000000000001}", "0", 0.0),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.333333", 1.0),  # 6 significant digits match
    ("\\boxed{0.3333}", "\\frac{1}{3}", 0.0),  # 4 do not
]


@pytest.mark.parametrize("completion, gold, reward", ADVERSARIAL)
def test_adversarial_completions(completion, gold, reward):
    assert math_accuracy([completion], [gold]) == [reward]


def test_reasoning_opened_by_the_prompt_and_trl_message_completions():
    # An assistant prefill ending in <think>: the completion starts inside the block.
    prompt = [{"role": "user", "content": "What is 47 + 38?"},
              {"role": "assistant", "content": "<think>"}]  # fmt: skip
    completions = ["47 + 38 = 85, so \\boxed{85}", "47 + 38 = 85</think>\\boxed{85}"]
    assert math_accuracy(completions, ["85"] * 2, prompts=[prompt] * 2) == [0.0, 1.0]
    assert boxed_format(completions, prompts=[prompt] * 2) == [0.0, 1.0]
    messages = [[{"role": "assistant", "content": "\\boxed{85}"}]]
    assert math_accuracy(messages, ["85"]) == [1.0]


def test_unparseable_gold_is_found_and_loud():
    assert check_gold_answer("\\frac{") is not None
    assert "no expression" in check_gold_answer("\\frac{")
    assert "undefined" in check_gold_answer("\\frac{1}{0}")
    assert "empty" in check_gold_answer("  ")
    for gold in ["85", "x = 2", "(1, 2)", "-1, 4", "\\frac{1}{2^{99}}", "\\text{Monday}", "3/4"]:
        assert check_gold_answer(gold) is None, gold
    with pytest.raises(ValueError, match=r"sample 1: .*'\\\\frac\{' cannot be graded"):
        math_accuracy(["\\boxed{1}", "The answer is 42"], ["1", "\\frac{"])


# --- the kinds behind them, as properties ---------------------------------------------
# Reasoning text: anything but a closing tag, including boxes, answer tags and nested opens.
REASONING = st.lists(
    st.sampled_from(["a", " ", "7", "\n", ".", "?", "\\boxed{5}", "\\boxed 9", "$\\boxed{4}$",
                     "<answer>3</answer>", "The answer is 6. ", "<think>", "<thinking>"]),
    max_size=12,
).map("".join)  # fmt: skip
FINALS = ["\\boxed{%s}", "<answer>%s</answer>", "The answer is %s.", "$\\boxed %s$",
          "Final answer: %s", "so $x = \\boxed{%s}$."]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(reasoning=REASONING, final=st.sampled_from(FINALS), value=st.integers(-99, 99),
       close=st.sampled_from(["</think>", "</thinking>", "</THINK>"]))  # fmt: skip
def test_reasoning_blocks_are_never_graded(reasoning, final, value, close):
    answer = final % value
    expected = extract_answer(answer)
    assert expected is not None and expected.removeprefix("x = ") == str(value)
    # Closed: whatever the reasoning says, only the text after it counts.
    assert extract_answer(f"<think>{reasoning}{close}{answer}") == expected
    assert extract_answer(f"{reasoning}{close}{answer}", think_opened=True) == expected
    # Never closed (cut off): no answer, wherever the block opens.
    assert extract_answer(f"<think>{reasoning}{answer}") is None
    assert extract_answer(f"{answer}<think>{reasoning}") is None
    assert extract_answer(f"<think>a{close}{answer}<think>{reasoning}") is None
    assert extract_answer(f"{reasoning}{answer}", think_opened=True) is None


@settings(max_examples=25, deadline=None)
@given(reasoning=REASONING, final=st.sampled_from(FINALS), value=st.integers(-20, 20),
       gold=st.integers(-20, 20))  # fmt: skip
def test_reasoning_blocks_end_to_end(reasoning, final, value, gold):
    # The gold itself sits in the reasoning, boxed: it must not count.
    completion = f"<think>{reasoning}\\boxed{{{gold}}}</think>{final % value}"
    assert verify_answer(str(gold), extract_answer(completion)) == float(value == gold)


def _sep_boxes(parts, seps):
    return (
        "".join(f"\\boxed{{{p}}}{s}" for p, s in zip(parts[:-1], seps, strict=True))
        + f"\\boxed{{{parts[-1]}}}"
    )


MULTI_PART_LAYOUTS = [
    lambda p, seps: "The solutions are " + _sep_boxes(p, seps) + ".",
    lambda p, seps: " and ".join(f"$x=\\boxed{{{v}}}$" for v in p),
    lambda p, seps: "We get \\boxed{99}. So " + _sep_boxes(p, seps),  # an earlier box apart
    lambda p, seps: "\\boxed{" + ", ".join(map(str, p)) + "}",
    lambda p, seps: "<answer>" + ", ".join(map(str, p)) + "</answer>",
    lambda p, seps: "The answer is " + ", ".join(map(str, p)) + ".",
    lambda p, seps: "<think>\\boxed{99}</think>\\[\\boxed{" + "}\\] or \\[\\boxed{".join(map(str, p)) + "}\\]",
]  # fmt: skip
SEPARATORS = [", ", " and ", ", and ", " or ", "; ", " \\text{ and } ", "\n", " ", "$ and $"]


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.integers(-30, 30), min_size=2, max_size=4, unique=True),
       layout=st.sampled_from(MULTI_PART_LAYOUTS), data=st.data())  # fmt: skip
def test_multi_part_answers_are_graded_whole(parts, layout, data):
    seps = data.draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(parts) - 1,
                              max_size=len(parts) - 1))  # fmt: skip
    answer = extract_answer(layout(parts, seps))
    gold = ", ".join(map(str, parts))
    assert verify_answer(gold, answer) == 1.0, answer
    shuffled = data.draw(st.permutations(parts))
    assert verify_answer(", ".join(map(str, shuffled)), answer) == 1.0  # a set: any order
    assert verify_answer(", ".join(map(str, parts[:-1])), answer) == 0.0  # a part missing
    assert verify_answer(f"{gold}, 31", answer) == 0.0  # a part too many


@settings(max_examples=30, deadline=None)
@given(pair=st.lists(st.integers(-30, 30), min_size=2, max_size=3, unique=True),
       form=st.sampled_from(["The answer is (%s).", "\\boxed{(%s)}", "<answer>(%s)</answer>"]))  # fmt: skip
def test_ordered_tuples_keep_their_order(pair, form):
    answer = extract_answer(form % ", ".join(map(str, pair)))
    assert verify_answer("(" + ", ".join(map(str, pair)) + ")", answer) == 1.0
    assert verify_answer("(" + ", ".join(map(str, pair[::-1])) + ")", answer) == 0.0


def _decimal(x: Decimal) -> str:
    """Positional notation with a decimal point ("1e-7" is not LaTeX; "85" would be exact)."""
    s = format(x, "f")
    return s if "." in s else s + ".0"


# Relative offsets clearly inside and clearly outside the tolerance.
INSIDE = st.floats(-0.9, 0.9)
OUTSIDE = st.one_of(st.floats(1.1, 1e4), st.floats(-1e4, -1.1))


@settings(max_examples=40, deadline=None)
@given(mantissa=st.integers(100_000, 999_999), exponent=st.integers(-40, 40),
       inside=INSIDE, outside=OUTSIDE, negative=st.booleans())  # fmt: skip
def test_decimals_match_within_relative_tolerance(mantissa, exponent, inside, outside, negative):
    # The same rule at every scale: math-verify's fixed 6 decimals fail tiny and huge numbers.
    getcontext().prec = 60
    gold = Decimal(mantissa).scaleb(exponent - 5) * (-1 if negative else 1)

    def pred(rel: float) -> str:
        return _decimal(gold * (1 + Decimal(rel) * Decimal(REL_TOL)))

    assert verify_answer(_decimal(gold), pred(inside)) == 1.0
    assert verify_answer(_decimal(gold), pred(outside)) == 0.0
    assert verify_answer(_decimal(gold), _decimal(-gold)) == 0.0  # the sign counts


@settings(max_examples=30, deadline=None)
@given(num=st.integers(-(10**6), 10**6), den=st.integers(2, 10**4), inside=INSIDE, outside=OUTSIDE)
def test_exact_golds_against_decimals(num, den, inside, outside):
    getcontext().prec = 60
    exact = Fraction(num, den)
    gold = f"\\frac{{{exact.numerator}}}{{{exact.denominator}}}"
    value = Decimal(exact.numerator) / Decimal(exact.denominator)
    if exact.denominator == 1:  # an integer gold is met exactly, never within a tolerance
        assert verify_answer(gold, _decimal(value)) == 1.0
        assert verify_answer(gold, _decimal(value + Decimal("1e-9"))) == 0.0
        return
    assert verify_answer(gold, _decimal(value * (1 + Decimal(inside) * Decimal(REL_TOL)))) == 1.0
    assert verify_answer(gold, _decimal(value * (1 + Decimal(outside) * Decimal(REL_TOL)))) == 0.0
    # exact against exact: equal values only, however close
    assert verify_answer(gold, f"\\frac{{{exact.numerator * 3}}}{{{exact.denominator * 3}}}") == 1.0
    assert verify_answer(gold, f"\\frac{{{exact.numerator * 10**12 + 1}}}{{{exact.denominator * 10**12}}}") == 0.0  # fmt: skip


# What the demo's reward pays must not change: a correct boxed integer answer, with any
# reasoning text around it (no tags, no other box), scores 1.0 on accuracy and on format.
DEMO_TEXT = st.text(alphabet="abcxyz ABC0123456789+-=*.,:;!?$()\n", max_size=40)


@settings(max_examples=40, deadline=None)
@given(before=DEMO_TEXT, after=DEMO_TEXT, value=st.integers(-200, 10_000))
def test_correct_boxed_integer_answers_still_pay(before, after, value):
    completion = f"{before}\\boxed{{{value}}}{after}"
    assert arithmetic_accuracy([completion], [str(value)]) == [1.0]
    assert boxed_format([completion]) == [1.0]
    assert arithmetic_accuracy([completion], [str(value + 1)]) == [0.0]
