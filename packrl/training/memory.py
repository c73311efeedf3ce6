"""How much memory a micro-batch's activations need, and how much there is for them.

The recipe's `enable_activation_checkpointing: auto` and `enable_activation_offloading: auto`
compare the two at start-up (`plan_activation_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch
from torch import nn

# Elements each transformer layer keeps per token for the backward pass of a llama-style
# block (norm inputs, q/k/v/o projections, attention output, SwiGLU gate/up/down inputs):
# about 10 * embed_dim + 2 * intermediate_dim. Calibrated on SmolLM2-135M in fp32 (D = 576,
# I = 1536, 30 layers), 1,024 tokens: checkpointing saves 1.11 GiB measured, against 1.01 GiB
# from this formula (tools/bench_activation_memory.py, docs/benchmarks.md, 2026-11-30).
_PER_TOKEN_LAYER = (10, 2)  # (x embed_dim, x intermediate_dim)


def activation_bytes(model: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Estimated bytes of activations a forward pass over ``tokens`` positions keeps for the
    backward pass without activation checkpointing (torchtune TransformerDecoder)."""
    layers = list(model.layers)
    if not layers:
        return 0
    embed_dim = model.tok_embeddings.embedding_dim
    mlp = layers[0].mlp
    inner = getattr(getattr(mlp, "w1", None), "out_features", 4 * embed_dim)
    per_token = _PER_TOKEN_LAYER[0] * embed_dim + _PER_TOKEN_LAYER[1] * inner
    return per_token * len(layers) * tokens * torch.finfo(dtype).bits // 8


def default_activation_budget(device: torch.device, trainable_bytes: int) -> int:
    """Bytes left for activations: on CUDA the free device memory less the gradients and
    AdamW states of the trainable parameters (3x their size) and a 20% margin; on CPU half of
    the memory the OS reports available (MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(0.8 * (free - 3 * trainable_bytes)))
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f}
    return int(info["MemAvailable"]) * 1024 // 2


def checkpointed_activation_bytes(model: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Estimated bytes kept with activation checkpointing on every layer: each layer's input,
    ``embed_dim`` elements per token (the rest is recomputed in backward)."""
    bits = torch.finfo(dtype).bits
    return model.tok_embeddings.embedding_dim * len(list(model.layers)) * tokens * bits // 8


def plan_activation_memory(
    checkpointing: bool | str,
    offloading: bool | str,
    *,
    need: int,
    need_checkpointed: int,
    budget: int,
    device_type: str,
) -> tuple[bool, bool]:
    """(checkpointing, offloading) for the settings ``true``, ``false`` or ``"auto"``.

    Auto checkpointing is on when ``need`` (bytes of a micro-batch's activations, see
    `activation_bytes`) exceeds ``budget``. Auto offloading is on only on CUDA, when the
    activations still kept (``need_checkpointed`` with checkpointing, else ``need``) exceed
    the budget: offloading moves them to CPU memory, and elsewhere they are there already.
    """
    ckpt = need > budget if checkpointing == "auto" else bool(checkpointing)
    if offloading != "auto":
        return ckpt, bool(offloading)
    kept = need_checkpointed if ckpt else need
    return ckpt, device_type == "cuda" and kept > budget


@functools.cache
def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries and systems."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def release_freed_host_memory() -> bool:
    """Hand the host heap's free pages back to the OS (glibc ``malloc_trim(0)``); returns
    whether it could.

    Why: glibc keeps freed heap memory resident, and a training step's activations and
    gradients (a few MB each) are freed in a different order than they were allocated, so
    the heap stays fragmented and resident memory climbs above live memory. On the CPU demo
    that retention was 0.5-0.9 GiB at the step's peak. The recipe trims before each CPU
    micro-batch and after its forward, which keeps the peak near live memory
    (``tools/bench_step_memory.py``, docs/benchmarks.md). A no-op off glibc.
    """
    trim = _glibc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
