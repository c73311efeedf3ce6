"""A step's rollouts: each rank samples and scores its share of the prompts, then all gather.

    groups = collect_rollouts(sampler, scorer, rows, prompt_ids, seeds, trainer_state, ...)

returns one ``GroupRollout`` per prompt, in prompt order, on every rank. Rank r samples
prompts r, r + world_size, ...; prompt i samples with ``seeds[i]``, so the result does not
depend on the number of ranks. Without a process group the gather is a no-op.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from packrl.rewards import RewardScorer, TrainerState, func_name
from packrl.rollout.base import Sampler
from packrl.rollout.group import GroupRollout
from packrl.tasks.base import RewardFn
from packrl.training.distributed import gather_objects, world


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt ``index`` at ``step`` (-1: evaluation), in [0, 2**56): the
    first 7 bytes of BLAKE2b("{seed}:{step}:{index}"). It depends only on these three, so a
    resumed run, or a run on any number of ranks, samples the same tokens."""
    key = f"{seed}:{step}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "big")


class GroupScorer:
    """Decodes and scores groups in place, calling reward functions in TRL's convention.

    Each reward function gets, for the N = sum of group sizes completions: ``prompts`` (each
    completion's chat), ``completions`` (for chat prompts TRL's conversational form
    ``[{"role": "assistant", "content": text}]``, else the text), ``completion_ids`` (its
    sampled token ids), every other column of its task row, and ``trainer_state``
    (``TrainerState``), as TRL's GRPOTrainer passes them.

    Args:
        rewards: the reward functions and weights.
        decode: token ids -> text.
        accuracy_func: the task's accuracy function (NaN accuracy when None); scored apart
            only when it is not one of the rewards.
    """

    def __init__(
        self,
        rewards: RewardScorer,
        decode: Callable[[list[int]], str],
        accuracy_func: RewardFn | None = None,
    ) -> None:
        self.rewards, self.decode = rewards, decode
        self.accuracy_name = None if accuracy_func is None else func_name(accuracy_func)
        self._accuracy = None
        if accuracy_func is not None and self.accuracy_name not in rewards.names:
            self._accuracy = RewardScorer([accuracy_func], max_failed_batches=None)

    def __call__(self, groups: Sequence[GroupRollout], trainer_state: TrainerState) -> None:
        """Fill ``text`` of every completion, and ``rewards``, ``reward``, ``accuracy`` and
        ``reward_failures`` of every group.

        Raises:
            RewardFunctionError: a reward function is broken (see ``RewardScorer``).
        """
        samples = [(g, c) for g in groups for c in g.completions]
        if not samples:
            return
        for _, c in samples:
            c.text = self.decode(c.token_ids)
        prompts = [g.row["messages"] for g, _ in samples]
        completions = [  # TRL's conversational form for chat prompts
            [{"role": "assistant", "content": c.text}] if isinstance(p, list) else c.text
            for p, (_, c) in zip(prompts, samples, strict=True)
        ]
        columns: dict[str, Any] = {
            key: [g.row[key] for g, _ in samples] for key in groups[0].row if key != "messages"
        }
        columns["completion_ids"] = [c.token_ids for _, c in samples]
        columns["trainer_state"] = trainer_state
        scores = self.rewards(prompts, completions, columns)
        if self.accuracy_name is None:
            accuracy = torch.full((len(samples),), float("nan"))
        elif self._accuracy is None:
            accuracy = scores.per_func[self.accuracy_name]
        else:
            accuracy = self._accuracy(prompts, completions, columns).total
        at = 0
        for g in groups:
            part = slice(at, at + g.group_size)
            g.rewards = {name: v[part].tolist() for name, v in scores.per_func.items()}
            g.reward = scores.total[part].tolist()
            g.accuracy = accuracy[part].tolist()
            g.reward_failures = {name: int(m[part].sum()) for name, m in scores.failed.items()}
            at += g.group_size


@dataclass
class Rollouts:
    """A step's groups (prompt order) and where this rank's time went."""

    groups: list[GroupRollout]
    generation_s: float  # this rank's time in the sampler
    scoring_s: float  # this rank's scoring, plus waiting for and gathering the other ranks


def collect_rollouts(
    sampler: Sampler,
    scorer: GroupScorer,
    rows: Sequence[dict[str, Any]],
    prompt_ids: Sequence[list[int]],
    seeds: Sequence[int],
    trainer_state: TrainerState,
    **sampling: Any,
) -> Rollouts:
    """Sample ``num_samples`` completions for each row (its prompt token ids in
    ``prompt_ids``, its seed in ``seeds``), score them, and gather every rank's groups.

    ``sampling`` goes to ``sampler.generate`` (num_samples, max_new_tokens, temperature,
    top_p, top_k). Every rank must call it (it gathers).
    """
    if not len(rows) == len(prompt_ids) == len(seeds):
        raise ValueError(
            f"{len(rows)} rows, {len(prompt_ids)} prompts and {len(seeds)} seeds: give one each"
        )
    t0 = time.perf_counter()
    world_size, rank = world()
    mine = list(range(rank, len(rows), world_size))
    local: list[GroupRollout] = []
    generation_s = 0.0
    if mine:
        completions = sampler.generate(
            [prompt_ids[i] for i in mine], seed=[seeds[i] for i in mine], **sampling
        )
        generation_s = time.perf_counter() - t0
        local = [
            GroupRollout(prompt_ids=list(prompt_ids[i]), completions=c, index=i, row=rows[i])
            for i, c in zip(mine, completions, strict=True)
        ]
        scorer(local, trainer_state)
    groups = sorted((g for part in gather_objects(local) for g in part), key=lambda g: g.index)
    return Rollouts(groups, generation_s, time.perf_counter() - t0 - generation_s)
