"""RewardScorer: weighted sums, and reward functions that raise, hang or return junk."""

import logging
import sys
import time

import pytest
import torch

from packrl.rewards import RewardFunctionError, RewardScorer, TrainerState, resolve_reward_funcs
from packrl.tasks.math import math_accuracy


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def answer_match(completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def raises_on_bad(completions, **kwargs):
    # Fails the whole batch when any completion is "bad", like a real parser bug would.
    return [float(1 / 0) if c == "bad" else 1.0 for c in completions]


def slow_reward(completions, **kwargs):
    time.sleep(30)
    return [1.0] * len(completions)


def junk_reward(completions, **kwargs):
    return [None, float("nan"), 2.0][: len(completions)]


PROMPTS = [[{"role": "user", "content": "q"}]] * 3


def test_weighted_sum_and_columns():
    scorer = RewardScorer([length_reward, answer_match], weights=[0.5, 2.0])
    scores = scorer(PROMPTS, ["ab", "c", "xyz"], {"answer": ["ab", "x", "xyz"]})
    assert torch.equal(scores.per_func["length_reward"], torch.tensor([2.0, 1.0, 3.0]))
    assert torch.equal(scores.per_func["answer_match"], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(scores.total, torch.tensor([3.0, 0.5, 3.5]))
    assert scores.failures == {"length_reward": 0, "answer_match": 0}


def test_raising_reward_costs_only_its_samples(caplog):
    scorer = RewardScorer([raises_on_bad, length_reward])
    with caplog.at_level(logging.WARNING, logger="packrl.rewards"):
        scores = scorer(PROMPTS, ["ok", "bad", "fine"], {})
    assert scores.per_func["raises_on_bad"].tolist() == [1.0, 0.0, 1.0]
    assert scores.failures["raises_on_bad"] == 1
    assert scores.total.tolist() == [3.0, 3.0, 5.0]
    assert "raises_on_bad" in caplog.text and "ZeroDivisionError" in caplog.text
    assert "test_rewards.py" in caplog.text  # traceback summary names the place


def test_slow_reward_times_out_without_blocking(caplog):
    scorer = RewardScorer([slow_reward, length_reward], timeout_s=0.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="packrl.rewards"):
        scores = scorer(PROMPTS, ["a", "bb", "ccc"], {})
    assert time.monotonic() - start < 3.0
    assert scores.per_func["slow_reward"].tolist() == [0.0, 0.0, 0.0]
    assert scores.failures["slow_reward"] == 3
    assert scores.per_func["length_reward"].tolist() == [1.0, 2.0, 3.0]
    assert "slow_reward did not finish" in caplog.text


def test_none_and_nan_values():
    scores = RewardScorer([junk_reward])(PROMPTS, ["a", "b", "c"], {})
    assert scores.per_func["junk_reward"].tolist() == [0.0, 0.0, 2.0]
    assert scores.failures["junk_reward"] == 1


def test_wrong_length_is_a_bug_that_stops_the_run():
    def too_many(completions, **kwargs):
        return [1.0] * (len(completions) + 1)

    with pytest.raises(RewardFunctionError, match="too_many returned 4 values for 3 completions"):
        RewardScorer([too_many])(PROMPTS, ["a", "b", "c"], {})


def exits(completions, **kwargs):
    sys.exit(3)


def exits_on_b(completions, **kwargs):
    return [sys.exit(0) if c == "b" else 1.0 for c in completions]


@pytest.mark.parametrize("fn", [exits, exits_on_b])
def test_system_exit_in_a_reward_costs_its_samples_visibly(fn, caplog):
    """sys.exit() inside a reward used to end its thread silently: every sample scored 0 with
    no failure counted. Now each sample it was raised on is a counted, logged failure."""
    scorer = RewardScorer([fn, length_reward])
    with caplog.at_level(logging.WARNING, logger="packrl.rewards"):
        scores = scorer(PROMPTS, ["a", "b", "ccc"], {})
    expected_failed = [True, True, True] if fn is exits else [False, True, False]
    assert scores.failed[fn.__name__].tolist() == expected_failed
    assert scores.failures[fn.__name__] == sum(expected_failed)
    assert scores.per_func["length_reward"].tolist() == [1.0, 1.0, 3.0]  # the others still count
    assert fn.__name__ in caplog.text and "SystemExit" in caplog.text


def test_a_reward_failing_every_sample_stops_after_max_failed_batches():
    def always_fails(completions, **kwargs):
        raise KeyError("answer")

    scorer = RewardScorer([always_fails, length_reward], max_failed_batches=2)
    scores = scorer(PROMPTS, ["a", "b", "c"], {})  # first failed batch: counted, run goes on
    assert scores.failures["always_fails"] == 3
    with pytest.raises(RewardFunctionError, match="always_fails failed on every sample of 2"):
        scorer(PROMPTS, ["a", "b", "c"], {})
    # a batch with one success resets the count
    flaky = RewardScorer([raises_on_bad], max_failed_batches=2)
    for batch in (["bad"] * 3, ["bad", "ok", "bad"], ["bad"] * 3):
        flaky(PROMPTS, batch, {})


def test_trl_keyword_arguments_reach_the_function():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, answer, **kwargs):
        seen.update(ids=completion_ids, step=trainer_state.global_step, answer=answer)
        return [0.0] * len(completions)

    state = TrainerState(global_step=7, max_steps=10)
    ids = [[1, 2], [3], [4, 5, 6]]
    RewardScorer([spy])(
        PROMPTS,
        ["a", "b", "c"],
        {"answer": ["x", "y", "z"], "completion_ids": ids, "trainer_state": state},
    )
    assert seen == {"ids": ids, "step": 7, "answer": ["x", "y", "z"]}


def test_resolve_reward_funcs():
    funcs = resolve_reward_funcs(["packrl.tasks.math.math_accuracy", answer_match])
    assert funcs == [math_accuracy, answer_match]
    with pytest.raises(ValueError, match="cannot import module 'nope.mod'"):
        resolve_reward_funcs(["nope.mod.fn"])
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        resolve_reward_funcs(["packrl.tasks.math.missing"])
    with pytest.raises(ValueError, match="dotted path"):
        resolve_reward_funcs(["justaname"])
    with pytest.raises(ValueError, match="2 weights"):
        RewardScorer([length_reward], weights=[1.0, 2.0])


def test_misaligned_column_is_a_clear_error():
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3"):
        RewardScorer([answer_match])(PROMPTS, ["a", "b", "c"], {"answer": ["a", "b"]})


def test_math_reward_through_scorer_by_dotted_path():
    scorer = RewardScorer(["packrl.tasks.math.math_accuracy"], max_workers=2)
    completions = ["\\boxed{85}", "The answer is 84", "\\boxed{7}", "7"] * 8  # 32, a step's worth
    completions[5] = "\\boxed{10^{10^{10}}}"  # ends at math-verify's own limit or the deadline
    answers = ["85", "84", "8", "7"] * 8
    prompts = [[{"role": "user", "content": "q"}]] * 32
    scores = scorer(prompts, completions, {"answer": answers})
    expected = [1.0, 1.0, 0.0, 0.0] * 8
    expected[5] = 0.0
    assert scores.total.tolist() == expected


def test_mapping_spec_binds_arguments():
    from packrl.tasks.shaping import soft_overlong_penalty

    (fn,) = resolve_reward_funcs(
        [
            {
                "path": "packrl.tasks.shaping.soft_overlong_penalty",
                "max_tokens": 10,
                "buffer_tokens": 4,
            }
        ]
    )
    assert fn.func is soft_overlong_penalty
    scores = RewardScorer([fn])(PROMPTS, ["a" * 6, "a" * 8, "a" * 12], {})
    assert scores.per_func["soft_overlong_penalty"].tolist() == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="needs a 'path'"):
        resolve_reward_funcs([{"max_tokens": 10}])


class TestShaping:
    """Format and length shaping rewards."""

    def test_think_answer_format(self):
        from packrl.tasks.shaping import think_answer_format

        good = "<think>47 + 38 = 85</think>\n<answer>85</answer>"
        cases = {
            good: 1.0,
            "  " + good + "\n  ": 1.0,  # surrounding whitespace is fine
            good + " Also, 86.": 0.0,  # trailing junk
            good + "<answer>86</answer>": 0.0,  # a second answer
            "<think>x</think><answer></answer>": 0.0,  # empty answer
            "<think> </think><answer>85</answer>": 0.0,  # empty thinking
            "<answer>85</answer>": 0.0,  # no thinking
            "Sure! <think>x</think><answer>85</answer>": 0.0,  # leading junk
            "<think>x<think>y</think><answer>85</answer>": 0.0,  # nested tag
            "<think>x</think>\n<answer>85": 0.0,  # truncated
            "": 0.0,
        }
        prompts = [[{"role": "user", "content": "q"}]] * len(cases)
        assert think_answer_format(list(cases), prompts) == list(cases.values())

    def test_think_opened_by_the_prompt(self):
        from packrl.tasks.shaping import think_answer_format

        opened = "47 + 38 = 85</think><answer>85</answer>"
        reopened = "<think>47 + 38</think><answer>85</answer>"
        prefill = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\n"}]
        assert think_answer_format([opened, reopened], [prefill, prefill]) == [1.0, 0.0]
        # Templates that add <think> to the generation prompt are set explicitly.
        plain = [[{"role": "user", "content": "q"}]] * 3
        got = think_answer_format([opened, reopened, opened + " junk"], plain, think_in_prompt=True)
        assert got == [1.0, 0.0, 0.0]
        assert think_answer_format([opened], plain) == [0.0]  # not opened: must open it itself

    def test_soft_overlong_penalty(self):
        from packrl.tasks.shaping import soft_overlong_penalty

        ids = [[0] * n for n in (0, 100, 768, 800, 896, 1024, 1025, 10**6)]
        got = soft_overlong_penalty(
            [""] * len(ids), completion_ids=ids, max_tokens=1024, buffer_tokens=256
        )
        assert got == [0.0, 0.0, 0.0, -0.125, -0.5, -1.0, -1.0, -1.0]  # never wraps past -1
        with pytest.raises(ValueError, match="buffer_tokens"):
            soft_overlong_penalty(["a"], max_tokens=10, buffer_tokens=0)

    def test_group_length_penalty(self):
        from packrl.tasks.shaping import group_length_penalty

        p1 = [{"role": "user", "content": "a"}]
        p2 = [{"role": "user", "content": "b"}]
        completions = ["xx", "xxxx", "xxxxxx", "y", "y", "zzz"]
        prompts = [p1, p1, p1, p2, p2, [{"role": "user", "content": "c"}]]
        assert group_length_penalty(completions, prompts) == [-0.0, -0.5, -1.0, 0.0, 0.0, 0.0]
        ids = [[1] * 5, [1] * 1, [1] * 3]  # token counts win over characters
        assert group_length_penalty(["a", "b", "c"], [p1] * 3, completion_ids=ids) == [
            -1.0,
            -0.0,
            -0.5,
        ]


def test_deadline_pool_kills_calls_stuck_in_c():
    from packrl.execution.workers import DeadlinePool

    # sum(range(n)) is one C loop: no signal handler (so no alarm) runs until it ends.
    # Builtins keep the workers' imports trivial (a test module would import torch there).
    pool = DeadlinePool(num_workers=2, memory_mb=None)
    try:
        start = time.monotonic()
        results = pool.map(sum, [(range(10**13),), (range(10),), (range(100),)], timeout_s=1.0)
        assert time.monotonic() - start < 1.0 + 5.0
        assert [r.ok for r in results] == [False, True, True]
        assert results[0].error == "timeout" and results[1].value == 45 and results[2].value == 4950
        again = pool.map(sum, [(range(10),)], timeout_s=5.0)  # the replaced worker works
        assert again[0].value == 45
        err = pool.map(sum, [("x",)], timeout_s=5.0)[0]
        assert not err.ok and err.error.startswith("TypeError")
    finally:
        pool.close()
