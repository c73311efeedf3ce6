"""The recipe's scoring speaks TRL's GRPOTrainer reward convention exactly (issue 10.2).

`GroupScorer` is what the training (and evaluation) recipe calls: chat prompts give
conversational completions `[{"role": "assistant", "content": text}]`, plus `completion_ids`,
every column of the row and `trainer_state`. Rewards here are written the way TRL's
documentation writes them.
"""

import re

import pytest

from packrl.rewards import RewardScorer, TrainerState
from packrl.rollout.base import Completion
from packrl.rollout.collect import GroupScorer
from packrl.rollout.group import GroupRollout


def format_reward_func(completions, **kwargs):
    """TRL docs: "Reward function that checks if the completion has a specific format"."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_len(completions, completion_ids, **kwargs):
    """TRL docs style: a length reward over the sampled token ids."""
    return [-abs(5 - len(ids)) for ids in completion_ids]


def step_and_column(completions, answer, trainer_state, prompts, **kwargs):
    assert all(p[-1]["role"] == "user" for p in prompts)  # each prompt: its message list
    return [trainer_state.global_step + (a == "7") for a in answer]


def _group(tokenizer, texts, answer="7"):
    row = {"messages": [{"role": "user", "content": "What is 3 + 4?"}], "answer": answer}
    prompt = tokenizer.tokenize_messages(row["messages"], add_generation_prompt=True)
    ids = [tokenizer.encode(t) for t in texts]
    completions = [Completion(t, [0.0] * len(t), finished=True) for t in ids]
    return GroupRollout(prompt_ids=prompt, completions=completions, row=row)


def test_trl_style_rewards_see_what_trl_passes(smollm2_tokenizer):
    texts = ["<think>3+4</think><answer>7</answer>", "seven", "<think>x</think> <answer>7"]
    groups = [_group(smollm2_tokenizer, texts), _group(smollm2_tokenizer, texts[:1], "8")]
    rewards = RewardScorer(
        [format_reward_func, reward_len, step_and_column, "packrl.tasks.math.math_accuracy"]
    )
    GroupScorer(rewards, smollm2_tokenizer.decode)(groups, TrainerState(global_step=3))
    g = groups[0]
    assert [c.text for c in g.completions] == texts  # decoded once, kept on the record
    assert g.rewards["format_reward_func"] == [1.0, 0.0, 0.0]
    lengths = [len(c.token_ids) for c in g.completions]
    assert g.rewards["reward_len"] == [-abs(5 - n) for n in lengths]
    assert g.rewards["step_and_column"] == [4.0, 4.0, 4.0]
    assert groups[1].rewards["step_and_column"] == [3.0]
    assert g.rewards["math_accuracy"] == [1.0, 0.0, 0.0]  # our rewards take both forms
    assert g.reward_failures == dict.fromkeys(g.rewards, 0)


@pytest.mark.parametrize("tokens, expected", [(40, 0.0), (48, 0.0), (56, -0.5), (64, -1.0)])
def test_soft_overlong_penalty_counts_tokens_in_the_recipe(smollm2_tokenizer, tokens, expected):
    """A 40-token completion of ~200 characters: 0.0 (it scored -1.0 when the recipe passed
    no token ids and the penalty counted characters)."""
    spec = {"path": "packrl.tasks.shaping.soft_overlong_penalty", "max_tokens": 64}
    rewards = RewardScorer([{**spec, "buffer_tokens": 16}])
    group = _group(smollm2_tokenizer, ["x"])
    group.completions[0] = Completion([1000 + i for i in range(tokens)], [0.0] * tokens, False)
    GroupScorer(rewards, smollm2_tokenizer.decode)([group], TrainerState())
    assert len(group.completions[0].text) > 64  # more characters than max_tokens
    assert group.rewards["soft_overlong_penalty"] == [expected]
