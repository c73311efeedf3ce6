"""The one task interface shared by every task and the GRPO recipe.

A task is a set of prompt rows plus reward functions. Reward functions follow TRL's
GRPOTrainer convention: they are called with keyword arguments

- ``prompts``: one chat (a list of ``{"role", "content"}`` messages) per completion;
- ``completions``: for chat prompts, TRL's conversational form, one
  ``[{"role": "assistant", "content": text}]`` per completion (``completion_text`` gives the
  text of either form);
- ``completion_ids``: the sampled token ids of each completion (length rewards count these);
- ``trainer_state``: ``packrl.rewards.TrainerState`` (``global_step``, ``max_steps``);
- every other column of the rows, each as a list aligned with ``completions``.

They return one float per completion (``None`` means "does not apply" and counts as 0). They
must accept ``**kwargs`` so that new columns never break them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[..., list[float | None]]
Row = dict[str, Any]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's ``[{"role": "assistant", "content": ...}]``.

    Raises:
        TypeError: anything else.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"completion must be a string or a list of messages, got {type(completion).__name__}"
    )


@dataclass
class Task:
    """A verifiable task.

    Attributes:
        name: short name, used in logs.
        train: training rows. Each row has ``"messages"`` (the chat up to, not including,
            the assistant's answer) and any further columns the reward functions need
            (``"answer"``, ``"tests"``, ...).
        eval: held-out rows in the same format, for periodic evaluation.
        reward_funcs: reward functions in TRL's convention (see module docstring).
        reward_weights: one weight per reward function; the training reward is the
            weighted sum.
        accuracy_func: the reward function whose mean is reported as accuracy and used
            for held-out evaluation (1.0 = fully correct). Usually also in reward_funcs.
        validate_rows: checks rows at start-up: for each row None when it is usable, else
            why not (e.g. a gold answer that does not parse). See ``packrl.tasks.checks``.
    """

    name: str
    train: Sequence[Row]
    eval: Sequence[Row]
    reward_funcs: list[RewardFn]
    reward_weights: list[float] = field(default_factory=list)
    accuracy_func: RewardFn | None = None
    validate_rows: Callable[[Sequence[Row]], list[str | None]] | None = None

    def __post_init__(self) -> None:
        if not self.reward_weights:
            self.reward_weights = [1.0] * len(self.reward_funcs)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"task {self.name!r}: {len(self.reward_funcs)} reward functions but "
                f"{len(self.reward_weights)} reward_weights; give one weight per function"
            )
        if not self.train:
            raise ValueError(f"task {self.name!r} has no training rows")
        for split, rows in (("train", self.train), ("eval", self.eval)):
            for i, row in enumerate(rows[:1]):  # full checks happen where rows are loaded
                if "messages" not in row:
                    raise ValueError(
                        f"task {self.name!r}: {split} row {i} has no 'messages' column"
                    )
