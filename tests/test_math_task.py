"""Math answer extraction, the math-verify reward in worker processes, and generated problems."""

import time

import pytest

from packrl.tasks.arithmetic import LEVELS, arithmetic_accuracy, arithmetic_task, generate_problems
from packrl.tasks.math import boxed_format, extract_answer, math_accuracy


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
    assert task.reward_funcs == [arithmetic_accuracy, boxed_format]
    assert task.reward_weights == [1.0, 0.2]
    rows = task.eval[:4]
    completions = [f"\\boxed{{{r['answer']}}}" for r in rows[:2]] + ["\\boxed{0}", "no idea"]
    assert task.accuracy_func(
        prompts=[r["messages"] for r in rows],
        completions=completions,
        answer=[r["answer"] for r in rows],
        difficulty=[r["difficulty"] for r in rows],
    ) == [1.0, 1.0, 0.0, 0.0]
    assert boxed_format(completions=completions) == [1.0, 1.0, 1.0, 0.0]
    same = arithmetic_task(n_train=300, n_eval=50, difficulty=1, seed=0)
    assert same.train == task.train


def test_boxed_format():
    completions = ["44 + 21 = 65. \\boxed{65}.", "\\boxed{}", "44 + 21 = 65", "**65**", "\\boxed{6"]
    assert boxed_format(completions=completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


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
