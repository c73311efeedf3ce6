"""The library pieces the recipe's step is made of: micro-batch plans and collect_rollouts."""

import pytest
import torch
from conftest import TINY_ARCH
from torchtune.models.llama3_2 import llama3_2

from packrl.rewards import RewardScorer, TrainerState
from packrl.rollout.collect import GroupScorer, collect_rollouts
from packrl.rollout.native import NativeSampler
from packrl.tasks.arithmetic import arithmetic_task
from packrl.training.micro_batches import plan_micro_batches


@pytest.mark.parametrize(
    "rows, per_mb, rank, world, plan",
    [
        (5, 2, 0, 1, [[0, 1], [2, 3], [4]]),
        (5, 2, 0, 2, [[0, 2], [4]]),  # rank 0: rows 0, 2, 4
        (5, 2, 1, 2, [[1, 3], None]),  # rank 1: rows 1, 3, then a filler to stay in step
        (3, 1, 1, 4, [[1]]),
        (3, 1, 3, 4, [None]),  # no row at all: still one forward/backward, a filler
        (0, 1, 0, 1, []),
    ],
)
def test_plan_micro_batches(rows, per_mb, rank, world, plan):
    assert plan_micro_batches(rows, per_mb, rank, world) == plan


def test_plan_micro_batches_bad_arguments():
    with pytest.raises(ValueError, match="rows_per_micro_batch must be >= 1"):
        plan_micro_batches(4, 0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        plan_micro_batches(4, 1, rank=2, world_size=2)


def distinct_chars(completions, **kwargs):
    return [len(set(c[0]["content"])) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def sampler_and_scorer(smollm2_tokenizer):
    torch.manual_seed(0)
    model = llama3_2(**TINY_ARCH).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0.0, 0.02)
    sampler = NativeSampler(model, stop_token_ids=[2], pad_id=smollm2_tokenizer.pad_id)
    rewards = RewardScorer([distinct_chars, "packrl.tasks.arithmetic.arithmetic_accuracy"])
    task = arithmetic_task(n_train=6, n_eval=0)
    scorer = GroupScorer(rewards, smollm2_tokenizer.decode, task.accuracy_func)
    return sampler, scorer, task, smollm2_tokenizer


def test_collect_rollouts_fills_one_record_per_prompt(sampler_and_scorer):
    sampler, scorer, task, tok = sampler_and_scorer
    rows = list(task.train[:3])
    prompts = [tok.tokenize_messages(r["messages"], add_generation_prompt=True) for r in rows]
    out = collect_rollouts(sampler, scorer, rows, prompts, [11, 12, 13], TrainerState(),
                           num_samples=2, max_new_tokens=6, temperature=1.0)  # fmt: skip
    assert [g.index for g in out.groups] == [0, 1, 2]
    for g, row, prompt in zip(out.groups, rows, prompts, strict=True):
        assert g.row is row and g.prompt_ids == prompt and g.group_size == 2
        assert [c.text for c in g.completions] == [tok.decode(c.token_ids) for c in g.completions]
        assert all(len(c.logprobs) == len(c.token_ids) <= 6 for c in g.completions)
        assert g.rewards["distinct_chars"] == pytest.approx(
            [len(set(c.text)) / 10 for c in g.completions]
        )
        assert g.accuracy == g.rewards["arithmetic_accuracy"]  # the task's accuracy is a reward
        assert g.reward == pytest.approx([a + b for a, b in zip(*g.rewards.values(), strict=True)])
        assert g.reward_failures == {"distinct_chars": 0, "arithmetic_accuracy": 0}
    assert out.generation_s > 0 and out.scoring_s > 0

    # Each prompt samples from its own seed: alone, it gets the same completions.
    alone = collect_rollouts(sampler, scorer, rows[1:2], prompts[1:2], [12], TrainerState(),
                             num_samples=2, max_new_tokens=6, temperature=1.0)  # fmt: skip
    assert [c.token_ids for c in alone.groups[0].completions] == [
        c.token_ids for c in out.groups[1].completions
    ]


def test_collect_rollouts_needs_one_seed_per_row(sampler_and_scorer):
    sampler, scorer, task, _ = sampler_and_scorer
    with pytest.raises(ValueError, match="2 rows, 2 prompts and 1 seeds"):
        collect_rollouts(sampler, scorer, task.train[:2], [[1], [2]], [0], TrainerState(),
                         num_samples=1, max_new_tokens=2, temperature=1.0)  # fmt: skip
