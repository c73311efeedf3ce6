"""What every sampling engine returns and offers (native KV-cache sampler, vLLM)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    token_ids: sampled tokens, prompt excluded; the stop token is included when one was hit.
    logprobs: log-probability of each sampled token under softmax(logits / temperature), the
        distribution before any top-p / top-k truncation (no renormalisation); under greedy
        decoding (temperature 0) it is softmax(logits). Same length as token_ids.
    finished: True if a stop token ended it, False if it was cut at max_new_tokens.
    text: the decoded completion, filled in when it is scored ("" until then).
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    text: str = ""

    @property
    def finish_reason(self) -> str:
        """The vLLM name of why it ended: "stop" (a stop token) or "length" (max_new_tokens)."""
        return "stop" if self.finished else "length"


def check_generate_args(
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    vocab_size: int,
    max_len: int,
    max_len_fix: str,
) -> None:
    """The checks every engine's ``generate`` makes; ``max_len`` is the longest prompt +
    completion the engine holds, ``max_len_fix`` what to do when a prompt exceeds it."""
    if not isinstance(prompts, list | tuple):
        raise TypeError("prompts: expected a list of token-id lists")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}]: is empty; every prompt needs at least one token")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompts[{i}]: token ids must be ints in [0, {vocab_size})")
        if len(prompt) + max_new_tokens > max_len:
            raise ValueError(
                f"prompts[{i}]: {len(prompt)} prompt tokens + max_new_tokens={max_new_tokens}"
                f" exceed {max_len_fix}"
            )
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")


def prompt_seeds(seed: int | Sequence[int] | None, num_prompts: int) -> list[str]:
    """One seed string per prompt from ``generate``'s ``seed``: one seed for the call (prompt
    p gets ``"seed:p"``), one per prompt, or None (drawn from torch's global RNG)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, int):
        return [f"{seed}:{p}" for p in range(num_prompts)]
    seeds = [str(int(s)) for s in seed]
    if len(seeds) != num_prompts:
        raise ValueError(f"seed: got {len(seeds)} per-prompt seeds for {num_prompts} prompts")
    return seeds


class Sampler(Protocol):
    """The interface the GRPO recipe uses; every engine implements it."""

    # Whether the behaviour logprobs it returns equal the trainer's (to about 1e-5 in fp32):
    # then the loss needs no rollout correction (GRPOLoss's rollout_correction: auto).
    logprobs_match_trainer: bool

    def generate(
        self,
        prompts: list[list[int]],
        *,
        num_samples: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int | Sequence[int] | None = None,
        progress: bool = False,
    ) -> list[list[Completion]]:
        """Returns completions indexed [prompt][sample]; `seed` is one seed or one per prompt."""
        ...

    def sync_weights(self, policy: nn.Module) -> None:
        """Serve `policy`'s current weights from now on. The recipe calls it after every
        optimizer step and after resuming. `policy` may be FSDP-sharded: then every rank
        calls it (the whole tensors are gathered collectively)."""
        ...

    def close(self) -> None:
        """Release the engine (the recipe calls it last, at cleanup)."""
        ...
