"""RewardScorer: weighted sums, and reward functions that raise, hang or return junk."""

import logging
import time

import pytest
import torch

from packrl.rewards import RewardScorer, resolve_reward_funcs
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


def test_wrong_length_is_a_failure_not_a_crash():
    def too_many(completions, **kwargs):
        return [1.0] * (len(completions) + 1)

    scores = RewardScorer([too_many])(PROMPTS, ["a", "b", "c"], {})
    assert scores.per_func["too_many"].tolist() == [0.0, 0.0, 0.0]
    assert scores.failures["too_many"] == 3


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
