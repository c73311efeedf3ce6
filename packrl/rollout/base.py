"""What every sampling engine returns and offers (native KV-cache sampler, vLLM)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    token_ids: sampled tokens, prompt excluded; the stop token is included when one was hit.
    logprobs: log-probability of each sampled token under softmax(logits / temperature), the
        distribution before any top-p / top-k truncation (no renormalisation); under greedy
        decoding (temperature 0) it is softmax(logits). Same length as token_ids.
    finished: True if a stop token ended it, False if it was cut at max_new_tokens.
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool


class Sampler(Protocol):
    """The interface the GRPO recipe uses; every engine implements it."""

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
