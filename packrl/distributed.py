"""Process-group helpers for running the recipe under torchrun (FSDP2), and as no-ops without.

One process per device. Every helper here works without a process group too (world size 1),
so library code calls them unconditionally and single-device runs take the same path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(world_size, rank); (1, 0) without a process group."""
    if not is_distributed():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathers an FSDP2 shard (a collective: every rank must call it,
    in the same order); a plain tensor is returned as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_parameters(
    model: nn.Module, *, trainable_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole detached tensor) for each parameter of a model, sharded or not.

    Names are the module's own (FSDP2 keeps them). Under FSDP each tensor is gathered when
    reached, so at most one whole parameter is held at a time beyond the caller's copies.
    """
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        yield name, full_tensor(p.detach())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; small ones: rollouts, scores)."""
    world_size, _ = world()
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a short list of floats (one collective)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
