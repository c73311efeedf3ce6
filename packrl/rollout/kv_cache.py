"""A static-shape KV cache and the cached forward pass of a torchtune decoder over it.

The cache is plain tensors, one key and one value tensor per layer, each
``[B, n_kv_heads, L, head_dim]``. Its shape is fixed when it is made, and a forward writes
its ``S`` new keys and values at cache slots ``slots`` (the same slots for every row), so a
compiled decode step sees the same shapes at every step and can be replayed without
re-tracing. The tensors are arguments of the forward, not module state: the model is left
untouched, a training forward never sees a cache, and the same compiled graph serves every
cache of the same shape.

``cached_forward`` walks the layers of a ``TransformerDecoder`` the way torchtune's
``TransformerSelfAttentionLayer`` and ``MultiHeadAttention`` do (norm, projections, RoPE,
optional q/k norms, attention, residuals, MLP), calling the model's own submodules, so LoRA,
DoRA and q/k/v biases apply as in training. Differences from torchtune's cached path: the
cache write is an ``index_copy_`` at a slot tensor (no per-module position counter), and
grouped-query attention never copies K and V per query head: the prefill leaves it to SDPA
(``enable_gqa``), a decode step groups the query heads by KV head (``decode_attention``).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchtune.modules import TransformerDecoder, TransformerSelfAttentionLayer


@dataclass
class StaticKVCache:
    """Keys and values of every layer: ``k[i]``, ``v[i]`` are ``[B, n_kv_heads, L, head_dim]``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def zeros(
        cls,
        layers: list[TransformerSelfAttentionLayer],
        batch: int,
        length: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> "StaticKVCache":
        """Zeros for ``batch`` rows of ``length`` slots in every layer of ``layers``. Slots
        never written must hold finite values: masked attention weights are 0, and 0 * NaN
        from uninitialised memory would still be NaN."""
        shape = [(batch, lay.attn.num_kv_heads, length, lay.attn.head_dim) for lay in layers]
        return cls(
            [torch.zeros(s, device=device, dtype=dtype) for s in shape],
            [torch.zeros(s, device=device, dtype=dtype) for s in shape],
        )

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def copy_rows(self, rows: torch.Tensor, out: "StaticKVCache") -> "StaticKVCache":
        """Writes rows ``rows`` [B'] of this cache (rows may repeat) into ``out`` (B' rows, same
        length), overwriting all of it, and returns ``out``."""
        for src, dst in zip(self.k + self.v, out.k + out.v, strict=True):
            torch.index_select(src, 0, rows, out=dst)
        return out


def self_attention_layers(model: TransformerDecoder) -> list[TransformerSelfAttentionLayer]:
    """The decoder's layers, unwrapped from activation-checkpoint wrappers.

    Raises:
        TypeError: if a layer is not a ``TransformerSelfAttentionLayer`` (e.g. a fusion or
            cross-attention layer, which this cache does not model).
    """
    layers = [getattr(layer, "_checkpoint_wrapped_module", layer) for layer in model.layers]
    for i, layer in enumerate(layers):
        if not isinstance(layer, TransformerSelfAttentionLayer):
            raise TypeError(
                f"model.layers[{i}]: the native sampler decodes only self-attention decoders "
                f"(TransformerSelfAttentionLayer), got {type(layer).__name__}"
            )
    return layers


def layer_forward(
    layer: TransformerSelfAttentionLayer,
    h: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """One layer over hidden states ``h`` [B, S, D]: writes the new keys and values into
    ``k_cache`` / ``v_cache`` [B, n_kv_heads, L, head_dim] at slots ``slots`` [S] (in place)
    and attends over the whole cache. ``positions`` [B, S] are RoPE positions; ``mask``
    [B, S, L] (bool, True = attend) must already include the slots written here.
    Returns the layer's output [B, S, D]."""
    b, s, _ = h.shape
    attn = layer.attn
    x = layer.sa_norm(h)
    q = attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim)
    if attn.pos_embeddings is not None:
        q = attn.pos_embeddings(q, input_pos=positions)
        k = attn.pos_embeddings(k, input_pos=positions)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, hd]
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    if s == 1:
        out = decode_attention(q, k_cache, v_cache, mask)
    else:
        out = F.scaled_dot_product_attention(
            q, k_cache, v_cache, attn_mask=mask[:, None], enable_gqa=True
        )  # [B, heads, S, hd]
    out = attn.output_proj(out.transpose(1, 2).reshape(b, s, -1))
    h = layer.sa_scale(out) + h
    return h + layer.mlp_scale(layer.mlp(layer.mlp_norm(h)))


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one new token per row over the cache, as two batched matmuls.

    q [B, heads, 1, hd]; k, v [B, n_kv_heads, L, hd]; mask [B, 1, L] (True = attend).
    Returns [B, heads, 1, hd]: softmax(q k^T / sqrt(hd)) v, the softmax in fp32. Query heads
    are grouped by the KV head they share (grouped-query attention), so K and V are read
    once, never copied per head. Why not SDPA: its CPU flash kernel took 2.4 ms per call for
    a 1-token query over 128 slots (B = 32), 48% of a bf16 decode step (docs/benchmarks.md).
    """
    b, heads, _, hd = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, kv_heads, heads // kv_heads, hd)  # [B, kv, heads/kv, hd]
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * hd**-0.5  # [B, kv, g, L]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)  # [B, kv, heads/kv, hd]
    return out.reshape(b, heads, 1, hd)


def cached_forward(
    model: TransformerDecoder,
    layers: list[TransformerSelfAttentionLayer],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    slots: torch.Tensor,
    cache: StaticKVCache,
    layer_fn: Callable[..., torch.Tensor] = layer_forward,
) -> torch.Tensor:
    """Runs ``tokens`` [B, S] through the embedding and every layer (``layer_fn``, which is
    ``layer_forward`` or a compiled copy of it), writing keys and values into ``cache`` at
    ``slots`` [S]; see ``layer_forward`` for ``positions`` and ``mask``. Returns the last
    layer's hidden states [B, S, D], before the final norm."""
    h = model.tok_embeddings(tokens)  # [B, S, D]
    for layer, k_cache, v_cache in zip(layers, cache.k, cache.v, strict=True):
        h = layer_fn(layer, h, positions, mask, slots, k_cache, v_cache)
    return h
