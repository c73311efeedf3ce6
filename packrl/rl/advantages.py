"""Group-relative advantages for GRPO.

Rewards come as a [P, G] tensor: P prompts, G completions sampled for each prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from packrl.rollout.group import GroupRollout


def _check_rewards(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be a [num_prompts, group_size] tensor, got shape {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating point tensor, got dtype {rewards.dtype}")


def group_advantages(rewards: Tensor, *, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """Advantage of each completion relative to its group: rewards [P, G] -> advantages [P, G].

    A = r - mean(group), divided by (std(group) + eps) when ``scale_by_std``.

    The std is the population std (``unbiased=False``): the spread of the G rewards actually
    seen, so that a scaled group has exactly unit variance. It is defined for any G >= 1, and
    for 0/1 rewards with success rate p it is sqrt(p * (1 - p)). The Bessel-corrected std
    (TRL's choice) only multiplies every advantage by sqrt((G - 1) / G), which the learning
    rate absorbs. A group whose rewards are all equal gets zero advantages either way.
    """
    _check_rewards(rewards)
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (it guards the division by a zero std), got {eps}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def uniform_groups(rewards: Tensor) -> Tensor:
    """Groups whose rewards are all equal: rewards [P, G] -> bool [P].

    Such groups have zero advantage everywhere and carry no policy-gradient signal (only KL),
    so the recipe may drop them before packing.
    """
    _check_rewards(rewards)
    return (rewards == rewards[:, :1]).all(dim=1)


SCALE_REWARDS = ("group", "batch", "none")


def assign_advantages(groups: Sequence[GroupRollout], scale_rewards: str = "group") -> None:
    """Set each group's ``advantages`` from its rewards: r - mean(group), divided by

    - "group": the group's std (GRPO, DeepSeekMath: Shao et al. 2024);
    - "batch": the std of all the step's rewards (TRL's ``scale_rewards="batch"``, as in
      "A Practical Two-Stage Recipe for Mathematical LLMs", Liu et al. 2025);
    - "none": nothing (Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training").

    Stds are population stds, plus eps = 1e-4 (see ``group_advantages``). All groups must
    have the same size.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if not groups:
        return
    rewards = torch.tensor([g.reward for g in groups], dtype=torch.float32)  # [P, G]
    advantages = group_advantages(rewards, scale_by_std=scale_rewards == "group")
    if scale_rewards == "batch":
        advantages = advantages / (rewards.std(unbiased=False) + 1e-4)
    for g, a in zip(groups, advantages.tolist(), strict=True):
        g.advantages = a
