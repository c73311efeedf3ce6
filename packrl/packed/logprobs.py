"""Per-token logprobs (and entropy) of the trained tokens of a packed batch.

The decoder runs to its final-norm hidden states [R, S, D]; only the hidden states that
predict trained tokens are gathered ([N, D], via ``pred_pos``) and projected to the
vocabulary in chunks of ``chunk_size`` tokens. The [R, S, vocab] logits are never built,
and with autograd each chunk is checkpointed, so backward also holds one chunk's logits
at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint
from torchtune.modules import TransformerDecoder

from packrl.packed.attention import packed_block_mask
from packrl.packed.packing import PackedBatch

__all__ = [
    "packed_logprobs",
    "forward_with_head",
    "final_hidden_states",
    "chunked_token_logprobs",
]


class _Head(nn.Module):
    """Stands in for an untied output projection (a submodule) during one forward."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


def forward_with_head(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    positions: torch.Tensor | None,
    mask: BlockMask | torch.Tensor | None,
    head: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor],
) -> torch.Tensor:
    """``model(tokens)`` with the output projection replaced by ``head(hidden, output)``,
    where hidden [R, S, D] are the final-norm hidden states (in the model's dtype) and
    ``output`` is the real projection. Returns what ``head`` returns, cast to float32.

    The head runs inside ``model.forward``, so under FSDP2 it sees the root's parameters
    (embeddings, output projection) gathered, and compiled layers and activation-checkpoint
    wrappers work as in a plain forward.
    """
    if hasattr(model, "caches_are_enabled") and model.caches_are_enabled():
        raise RuntimeError(
            "the model's KV caches are enabled; run training/scoring forwards outside the "
            "sampler's cache context (torchtune.modules.common_utils.disable_kv_cache)"
        )
    output = model.output
    dtype = model.tok_embeddings.weight.dtype

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        # project in the model's dtype, as torchtune does (unembed casts the result to fp32)
        return head(hidden.to(dtype), output)

    # a tied projection (TiedLinear) is a plain attribute, an untied one a submodule
    model.output = _Head(fn) if isinstance(output, nn.Module) else fn
    try:
        return model(tokens, mask=mask, input_pos=positions)
    finally:
        model.output = output


def final_hidden_states(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    positions: torch.Tensor | None,
    mask: BlockMask | torch.Tensor | None,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Hidden states after the final norm [R, S, D] (model dtype), and the output projection
    (one device only: under FSDP2 the projection is usable inside the forward only, see
    :func:`forward_with_head`)."""
    dtype = model.tok_embeddings.weight.dtype
    hidden = forward_with_head(model, tokens, positions, mask, lambda h, _: h)
    return hidden.to(dtype), model.output


def _chunk_logprobs(output, hidden, targets, temperature: float, with_entropy: bool):
    """hidden [n, D], targets [n] -> logprobs [n], entropy [n] (or empty)."""
    logits = output(hidden).float() / temperature  # [n, vocab]
    logz = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logprobs, logprobs.new_empty(0)
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return logprobs, entropy


def chunked_token_logprobs(
    output: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) from hidden [N, D] through ``output``, ``chunk_size`` rows at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    grad = torch.is_grad_enabled() and hidden.requires_grad
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (output, hidden[start : start + chunk_size], targets[start : start + chunk_size])
        if grad:  # recompute the chunk's logits in backward instead of keeping them
            lp, ent = checkpoint(
                _chunk_logprobs, *args, temperature, with_entropy, use_reentrant=False
            )
        else:
            lp, ent = _chunk_logprobs(*args, temperature, with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logprobs = torch.cat(logprobs) if logprobs else empty
    entropy = (torch.cat(entropies) if entropies else empty) if with_entropy else None
    return logprobs, entropy


def packed_logprobs(
    model: TransformerDecoder,
    batch: PackedBatch,
    *,
    mask: BlockMask | torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs [R, S] (and entropy [R, S]) of the trained tokens; 0 elsewhere.

    ``mask`` defaults to ``packed_block_mask`` of the batch (the model must have been
    passed through ``packrl.packed.attention.use_packed_attention``); a dense
    ``packed_dense_mask`` works with any torchtune decoder. Works under ``torch.no_grad``
    (reference model) and with autograd, LoRA and activation checkpointing.
    """
    if mask is None:
        mask = packed_block_mask(batch.group_ids, batch.parent_ids)
    rows, cols = batch.trained.nonzero(as_tuple=True)  # N trained tokens
    targets = batch.tokens[rows, cols]

    def head(hidden: torch.Tensor, output) -> torch.Tensor:
        """[R, S, D] -> logprobs [N], or [2, N] with entropy."""
        h = hidden[rows, batch.pred_pos[rows, cols]]  # [N, D]
        lp, ent = chunked_token_logprobs(
            output,
            h,
            targets,
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
        )
        return lp if ent is None else torch.stack([lp, ent])

    out = forward_with_head(model, batch.tokens, batch.positions, mask, head)
    lp, ent = (out, None) if out.dim() == 1 else (out[0], out[1])
    logprobs = torch.zeros(batch.tokens.shape, dtype=torch.float32, device=lp.device)
    logprobs = logprobs.index_put((rows, cols), lp)
    entropy = None
    if ent is not None:
        entropy = torch.zeros_like(logprobs).index_put((rows, cols), ent)
    return logprobs, entropy
