"""Which packed rows each rank trains, in which micro-batches."""

from __future__ import annotations


def plan_micro_batches(
    num_rows: int, rows_per_micro_batch: int, rank: int = 0, world_size: int = 1
) -> list[list[int] | None]:
    """This rank's micro-batches of a packed batch of ``num_rows`` rows.

    Rank r trains rows r, r + world_size, ..., in micro-batches of at most
    ``rows_per_micro_batch`` rows. Under FSDP every forward/backward gathers and reduces
    shards, so every rank must run the same number of them: a rank with fewer rows gets
    ``None`` entries, filler micro-batches that run a real row with an empty loss mask (zero
    gradient, no stats).

    Returns:
        ceil(ceil(num_rows / world_size) / rows_per_micro_batch) entries: lists of row
        indices, then ``None`` fillers.

    Raises:
        ValueError: ``rows_per_micro_batch`` < 1 or ``rank`` outside [0, world_size).
    """
    if rows_per_micro_batch < 1:
        raise ValueError(f"rows_per_micro_batch must be >= 1, got {rows_per_micro_batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    mine = list(range(rank, num_rows, world_size))
    plan: list[list[int] | None] = [
        mine[i : i + rows_per_micro_batch] for i in range(0, len(mine), rows_per_micro_batch)
    ]
    rows_per_rank = -(-num_rows // world_size)
    passes = -(-rows_per_rank // rows_per_micro_batch)
    return plan + [None] * (passes - len(plan))
