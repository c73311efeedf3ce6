"""Attention masks for packed rows, and the attention call that runs them in torchtune.

The rule, for query position q and key position k of the same row::

    allowed(q, k) = k <= q and (group[k] == group[q] or group[k] == parent[q])

A prompt segment is its own parent, so it is causal over itself; a completion tail's
parent is its prompt, so it sees the whole prompt (which lies before it) and its own
earlier tokens, never a sibling's. Every position may attend to itself, so no row of the
mask is empty and padding (group = parent = -1) cannot produce NaN.

Two equivalent masks:
- ``packed_block_mask``: a flex-attention ``BlockMask`` (128x128 blocks, memory
  ~ R * (S/128)^2 ints), the fast path.
- ``packed_dense_mask``: a boolean [R, S, S] tensor (torchtune's mask layout), the fallback.

torchtune 0.6.1 sends a ``BlockMask`` to flex attention only when CUDA is present
(``torchtune.utils._import_guard._SUPPORTS_FLEX_ATTENTION``); on CPU it hands the
BlockMask to SDPA, which fails. On CPU, torch 2.13's flex attention has no backward, its
compiled kernel costs 13-20 s of C++ compilation per new shape on a 2-core machine, and
``dynamic=True`` fails to compile. ``use_packed_attention(model)`` therefore replaces each
attention module's ``_attention_call`` with ``packed_attention_call``:

- ``BlockMask`` on CUDA: compiled ``flex_attention`` (as torchtune would do there);
- ``BlockMask`` on CPU: ``blockwise_attention``, the same block-sparse computation in
  PyTorch ops (only the blocks the mask keeps are computed; with autograd each query block
  is recomputed in backward, so memory stays O(S) like a flash kernel);
- a tensor mask or None: SDPA exactly as torchtune does it (KV-cache sampling unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torchtune.modules import MultiHeadAttention

__all__ = [
    "BLOCK_SIZE",
    "packed_mask_mod",
    "packed_dense_mask",
    "packed_block_mask",
    "blockwise_attention",
    "packed_attention_call",
    "use_packed_attention",
]

BLOCK_SIZE = 128


def packed_mask_mod(group_ids: torch.Tensor, parent_ids: torch.Tensor) -> Callable:
    """The rule as a flex-attention mask_mod(b, h, q_idx, kv_idx); ids are [R, S]."""

    def mask_mod(b, h, q_idx, kv_idx):
        key_group = group_ids[b, kv_idx]
        return (kv_idx <= q_idx) & (
            (key_group == group_ids[b, q_idx]) | (key_group == parent_ids[b, q_idx])
        )

    return mask_mod


def _allowed(group_ids, parent_ids, q_idx, kv_idx) -> torch.Tensor:
    """allowed[r, i, j] for queries q_idx [Q] and keys kv_idx [K] -> bool [R, Q, K]."""
    key_group = group_ids[:, None, kv_idx]  # [R, 1, K]
    return (kv_idx[None, None, :] <= q_idx[None, :, None]) & (
        (key_group == group_ids[:, q_idx, None]) | (key_group == parent_ids[:, q_idx, None])
    )


def packed_dense_mask(group_ids: torch.Tensor, parent_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [R, S, S] (True = attend) for ``TransformerDecoder(mask=...)``."""
    S = group_ids.shape[1]
    idx = torch.arange(S, device=group_ids.device)
    return _allowed(group_ids, parent_ids, idx, idx)


def packed_block_mask(
    group_ids: torch.Tensor, parent_ids: torch.Tensor, block_size: int = BLOCK_SIZE
) -> BlockMask:
    """Block-sparse mask (flex attention) for ids [R, S], built one query block at a time.

    Each (query block, key block) pair is classified as empty, full (every pair allowed,
    the kernel skips mask_mod) or partial. Building it needs R * block_size * S bools at
    a time, never the R * S * S mask that ``create_block_mask`` materialises.
    """
    R, S = group_ids.shape
    device = group_ids.device
    n = -(-S // block_size)
    kv_idx = torch.arange(S, device=device)
    partial = torch.zeros(R, n, n, dtype=torch.bool, device=device)
    full = torch.zeros(R, n, n, dtype=torch.bool, device=device)
    pad = n * block_size - S
    for i in range(n):
        q_idx = kv_idx[i * block_size : (i + 1) * block_size]
        allowed = _allowed(group_ids, parent_ids, q_idx, kv_idx)  # [R, <=bs, S]
        # out-of-range queries/keys count as "not allowed", so edge blocks are never full
        allowed = F.pad(allowed, (0, pad, 0, block_size - len(q_idx)))
        allowed = allowed.view(R, block_size, n, block_size)
        any_ = allowed.any(dim=3).any(dim=1)  # [R, n]
        all_ = allowed.all(dim=3).all(dim=1)
        full[:, i] = all_
        partial[:, i] = any_ & ~all_

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [R, n, n] bool -> counts [R, 1, n], indices of set blocks first [R, 1, n, n]
        dense = dense.to(torch.int32)
        counts = dense.sum(-1).to(torch.int32)
        indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None].contiguous(), indices[:, None].contiguous()

    kv_num, kv_indices = ordered(partial)
    full_num, full_indices = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=packed_mask_mod(group_ids, parent_ids),
        seq_lengths=(S, S),
    )


def block_mask_nbytes(mask: BlockMask | torch.Tensor) -> int:
    """Bytes held by a mask (a BlockMask's index tensors, or a dense tensor)."""
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    tensors = [
        mask.kv_num_blocks,
        mask.kv_indices,
        mask.full_kv_num_blocks,
        mask.full_kv_indices,
        mask.q_num_blocks,
        mask.q_indices,
        mask.full_q_num_blocks,
        mask.full_q_indices,
    ]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _cpu_plan(block_mask: BlockMask) -> list[tuple]:
    """Per (row, query block): (row, query slice, key runs, allowed [Q, K] or None).

    Key runs are the ranges of consecutive kept key blocks; ``allowed`` covers their
    concatenation (None when every pair is allowed). Built once per BlockMask (every layer
    reuses it) and cached on the mask; it holds one bool per kept (query, key) pair.
    """
    if hasattr(block_mask, "_packrl_cpu_plan"):
        return block_mask._packrl_cpu_plan
    S = block_mask.seq_lengths[0]
    bq, bk = block_mask.BLOCK_SIZE
    kv_num = block_mask.kv_num_blocks[:, 0].tolist()  # [R][n_q]
    kv_ind = block_mask.kv_indices[:, 0].tolist()
    full_num = block_mask.full_kv_num_blocks[:, 0].tolist()
    full_ind = block_mask.full_kv_indices[:, 0].tolist()
    device = block_mask.kv_indices.device
    plan = []
    for r in range(len(kv_num)):
        b = torch.tensor(r, device=device)
        for i in range(len(kv_num[r])):
            blocks = sorted(kv_ind[r][i][: kv_num[r][i]] + full_ind[r][i][: full_num[r][i]])
            runs: list[list[int]] = []
            for blk in blocks:
                if runs and runs[-1][1] == blk * bk:
                    runs[-1][1] = min(S, (blk + 1) * bk)
                else:
                    runs.append([blk * bk, min(S, (blk + 1) * bk)])
            key_idx = torch.cat([torch.arange(a, e, device=device) for a, e in runs])
            q_idx = torch.arange(i * bq, min(S, (i + 1) * bq), device=device)
            allowed = block_mask.mask_mod(b, None, q_idx[:, None], key_idx[None, :])
            runs_ = [slice(a, e) for a, e in runs]
            plan.append((r, slice(i * bq, (i + 1) * bq), runs_, None if allowed.all() else allowed))
    block_mask._packrl_cpu_plan = plan
    return plan


def _additive(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """bool [Q, K] -> [1, 1, Q, K] of 0 / -inf in ``dtype`` (the CPU flash kernel's format)."""
    if allowed is None:
        return None
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill_(~allowed, float("-inf"))[None, None]


def _gather(x: torch.Tensor, r: int, runs: list[slice]) -> torch.Tensor:
    """x[r:r+1, :, keys] for keys given as runs of positions -> [1, H, K, D]."""
    if len(runs) == 1:
        return x[r : r + 1, :, runs[0]]
    return torch.cat([x[r : r + 1, :, run] for run in runs], dim=2)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _BlockwiseAttention(torch.autograd.Function):
    """Flash attention over the key blocks each query block keeps, forward and backward.

    Saves only q, k, v, the output and the log-sum-exp (like a flash kernel); backward
    re-gathers each query block's keys and scatter-adds their gradients.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        for r, qs, runs, allowed in plan:
            o, lse_blk = _flash_cpu(
                q[r : r + 1, :, qs],
                _gather(k, r, runs),
                _gather(v, r, runs),
                attn_mask=_additive(allowed, q.dtype),
            )
            out[r, :, qs] = o[0]
            lse[r, :, qs] = lse_blk[0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for r, qs, runs, allowed in ctx.plan:
            gq, gk, gv = _flash_cpu_backward(
                grad_out[r : r + 1, :, qs].contiguous(),
                q[r : r + 1, :, qs],
                _gather(k, r, runs),
                _gather(v, r, runs),
                out[r : r + 1, :, qs],
                lse[r : r + 1, :, qs],
                0.0,
                False,
                attn_mask=_additive(allowed, q.dtype),
            )
            dq[r, :, qs] = gq[0]
            at = 0
            for run in runs:  # each key gets gradient from this query block once
                n = run.stop - run.start
                dk[r, :, run] += gk[0, :, at : at + n]
                dv[r, :, run] += gv[0, :, at : at + n]
                at += n
        return dq, dk, dv, None


def blockwise_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """Block-sparse attention on CPU with fused flash kernels; q, k, v [R, H, S, D].

    For each query block, gathers the key blocks the BlockMask keeps (partial and full)
    and runs the CPU flash-attention kernel with mask_mod evaluated on them, so only kept
    blocks are computed. Differentiable, with O(S) saved memory.
    """
    if q.shape[2] != block_mask.seq_lengths[0]:
        raise ValueError(
            f"sequence length {q.shape[2]} != BlockMask length {block_mask.seq_lengths[0]}"
        )
    return _BlockwiseAttention.apply(q, k, v, _cpu_plan(block_mask))


@cache
def _compiled_flex_attention() -> Callable:
    # Compiled once per process; uncompiled flex attention materialises all scores.
    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable(recursive=False)
def _flex(q, k, v, block_mask):
    # Kept out of an enclosing torch.compile (nested compile is not allowed), as torchtune does.
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask)


def packed_attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask | torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> torch.Tensor:
    """Drop-in for ``MultiHeadAttention._attention_call``; q, k, v [b, h, s, d]."""
    if isinstance(mask, BlockMask):
        if dropout_p > 0.0:
            raise ValueError(
                "packed attention does not support attention dropout; set attn_dropout=0"
            )
        if q.device.type == "cpu":
            return blockwise_attention(q, k, v, mask)
        return _flex(q, k, v, mask)
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]  # [b, s, s] -> [b, 1, s, s], as torchtune does
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
    )


def use_packed_attention(model: nn.Module) -> nn.Module:
    """Route every torchtune attention module of ``model`` through ``packed_attention_call``.

    Idempotent; returns the model. Tensor masks and None behave exactly as in torchtune,
    so KV-cache generation with the same model is unchanged.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module._attention_call = packed_attention_call
            n += 1
    if n == 0:
        raise ValueError(
            f"{type(model).__name__} has no torchtune MultiHeadAttention modules; "
            "use_packed_attention needs a torchtune TransformerDecoder"
        )
    return model
