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
from torch.distributed.tensor import DTensor, distribute_tensor


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


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Element-wise "sum" or "max" over ranks of a short list of floats (one collective)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def gather_to_rank0(obj: Any) -> Any:
    """A nested state (dicts, lists, tensors, plain values) with every tensor whole and on
    CPU, on rank 0; None on the other ranks.

    Sharded tensors are gathered one at a time (collectives, in the state's own order, which
    is the same on every rank), and only rank 0 keeps them: the other ranks never hold a
    second whole copy of the model or the optimizer. A tensor that is already whole and on
    the CPU is returned as it is, not copied (the caller must not modify it): a copy of the
    model and its AdamW states raised the resident memory of a CPU run of SmolLM2-135M by
    1.6 GB at every save (tools/bench_checkpoint.py, docs/benchmarks.md).
    """
    _, rank = world()

    def visit(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            whole = full_tensor(x.detach())
            return whole.to("cpu").contiguous() if rank == 0 else None
        if isinstance(x, dict):
            return {k: visit(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(visit(v) for v in x)
        return x

    out = visit(obj)
    return out if rank == 0 else None


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `like`: this rank's shard of it when `like` is an FSDP2 DTensor
    (every rank holds `whole`, so each cuts its own shard: no communication), otherwise
    `whole` on `like`'s device and dtype."""
    if isinstance(like, DTensor):
        return distribute_tensor(
            whole.to(like.device_mesh.device_type).to(like.dtype),
            like.device_mesh,
            like.placements,
            src_data_rank=None,
        )
    return whole.to(device=like.device, dtype=like.dtype)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
