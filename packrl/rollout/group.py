"""The record a step's data flows in: one prompt and its G completions, from sampler to loss.

Each stage fills in its own fields and no stage reshapes the data:

    sampler      -> prompt_ids, completions[j].token_ids / .logprobs / .finished
    scoring      -> completions[j].text, rewards, reward, accuracy, reward_failures
    advantages   -> advantages
    loss weights -> loss_weights
    packing      -> reads all of the above (``packrl.packed.packing.pack_groups``)

A step is a ``list[GroupRollout]`` in prompt order; distributed gather and the filter of
uniform groups keep or drop whole records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from packrl.rollout.base import Completion


@dataclass
class GroupRollout:
    """One prompt and its sampled completions: the unit GRPO normalises advantages over.

    Attributes:
        prompt_ids: the prompt's token ids (chat template applied).
        completions: G sampled completions (token ids, behaviour logprobs, text, finish).
        index: the prompt's position in its step (its sampling seed follows from it).
        row: the task row it came from (``messages`` and the dataset's other columns).
        rewards: reward function name -> G unweighted rewards.
        reward: G weighted total rewards (what the advantages are computed from).
        accuracy: G accuracy values (NaN when the task has no accuracy function).
        reward_failures: reward function name -> how many of these G samples failed.
        advantages: G group-relative advantages.
        loss_weights: G per-token loss weights (the aggregation, see ``packrl.rl.loss``).
    """

    prompt_ids: list[int]
    completions: list[Completion]
    index: int = 0
    row: dict[str, Any] = field(default_factory=dict)
    rewards: dict[str, list[float]] = field(default_factory=dict)
    reward: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    reward_failures: dict[str, int] = field(default_factory=dict)
    advantages: list[float] = field(default_factory=list)
    loss_weights: list[float] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return len(self.completions)

    @property
    def lengths(self) -> list[int]:
        """Number of sampled tokens of each completion (stop token included)."""
        return [len(c.token_ids) for c in self.completions]

    @property
    def is_uniform(self) -> bool:
        """All G rewards equal: zero advantage everywhere, no policy-gradient signal."""
        return all(r == self.reward[0] for r in self.reward)
