"""Tasks: prompts plus verifiable reward functions. See `packrl.tasks.base.Task`."""

from packrl.tasks.base import RewardFn, Task

__all__ = ["RewardFn", "Task"]
