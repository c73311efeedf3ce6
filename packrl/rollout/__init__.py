"""Samplers: turn prompts into completions with sampled-token logprobs."""

from packrl.rollout.base import Completion, Sampler
from packrl.rollout.native import NativeSampler

__all__ = ["Completion", "NativeSampler", "Sampler"]
