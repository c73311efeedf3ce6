"""Building a recipe's components from its config (torchtune's `config.instantiate`), with
errors that name the config key, for every recipe."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torchtune import config

from packrl.rollout.collect import GroupScorer
from packrl.tasks.base import Task
from packrl.training.config_schema import ConfigError


def instantiate(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """`config.instantiate(cfg[key], ...)`, None for a null section.

    Raises:
        ConfigError: the component raised ValueError. Components name the argument first
            ("epsilon_low must be ..."), so the error names the full key
            ('loss.epsilon_low'), else the section and its component.
    """
    section = cfg[key]
    if section is None:
        return None
    try:
        return config.instantiate(section, *args, **kwargs)
    except ValueError as e:
        arg, _, rest = str(e).partition(" ")
        if arg in section:
            raise ConfigError(f"'{key}.{arg}' {rest}") from e
        raise ConfigError(f"'{key}' ({section._component_}): {e}") from e


def build_scorer(cfg: DictConfig, task: Task, decode: Any) -> GroupScorer:
    """The `rewards` section's RewardScorer (the task's reward functions and weights unless
    the config names its own) with the task's accuracy function, as a GroupScorer."""
    section = cfg.rewards
    defaults = {}
    if section.get("reward_funcs") is None:
        defaults["reward_funcs"] = list(task.reward_funcs)
        if section.get("weights") is None:
            defaults["weights"] = list(task.reward_weights)
    rewards = instantiate(cfg, "rewards", **defaults)
    return GroupScorer(rewards, decode, task.accuracy_func)
