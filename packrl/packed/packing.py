"""Pack GRPO groups (one prompt, G completions) into fixed-length rows.

Each row holds one or more *segments*: a prompt, followed by completion tails of that
prompt. A prompt is stored once per row and every tail's RoPE positions continue the
prompt, as if the tail followed the prompt directly. Attention (see ``packrl.packed.attention``)
lets a prompt token see earlier tokens of its prompt, and a tail token see its whole
prompt plus earlier tokens of its own tail, never a sibling's.

A completion's first token is predicted by the output at the prompt's LAST token, for
every sibling in the row (the tail placed right after the prompt is no special case).
``pred_pos`` names, for each trained token, the position in the same row whose output
predicts it, so the loss never relies on "the previous position".

Example row (prompt p0 p1 p2, completions a0 a1 and b0 b1 b2, row_len 10)::

    tokens     p0 p1 p2 a0 a1 b0 b1 b2 pad pad
    positions   0  1  2  3  4  3  4  5   0   0
    group_ids   0  0  0  1  1  2  2  2  -1  -1
    parent_ids  0  0  0  0  0  0  0  0  -1  -1
    trained     .  .  .  x  x  x  x  x   .   .
    pred_pos    0  1  2  2  3  2  5  6   8   9
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

from packrl.rollout.group import GroupRollout

T = TypeVar("T")

__all__ = ["PackedBatch", "PackingStats", "pack_groups"]

PAD_GROUP = -1  # group/parent id of padding positions


@dataclass
class PackingStats:
    """How many token positions a layout computes, for one packed batch.

    - ``positions``: rows * row_len, what the model computes for this batch (padding included).
    - ``tokens``: non-padding positions (prompts once per row, plus completion tokens).
    - ``padded_positions``: one row per completion, every row padded to the longest
      prompt+completion (a padded GRPO trainer).
    - ``unshared_positions``: sum of prompt+completion lengths (packing without sharing
      prompts, before row padding).
    - ``saved_fraction``: 1 - positions / padded_positions.
    """

    rows: int
    row_len: int
    sequences: int
    trained_tokens: int
    tokens: int
    positions: int
    padded_positions: int
    unshared_positions: int
    saved_fraction: float


@dataclass
class PackedBatch:
    """R rows of S = row_len positions. All tensors are [R, S].

    ``group_ids`` and ``parent_ids`` are attention segment ids, unique within the batch:
    a prompt segment's parent is itself, a completion tail's parent is its prompt
    segment, padding is -1 for both. ``seq_ids`` numbers completions globally in
    group-major order (completion j of group g), -1 where not trained. ``pred_pos`` is
    only meaningful where ``trained``; elsewhere it points at the position itself.
    """

    tokens: torch.Tensor  # long
    positions: torch.Tensor  # long, RoPE positions
    group_ids: torch.Tensor  # long
    parent_ids: torch.Tensor  # long
    trained: torch.Tensor  # bool
    pred_pos: torch.Tensor  # long
    behaviour_logprobs: torch.Tensor  # float32, 0 where not trained
    advantages: torch.Tensor  # float32, 0 where not trained
    loss_weights: torch.Tensor  # float32, 0 where not trained
    seq_ids: torch.Tensor  # long, -1 where not trained
    stats: PackingStats

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_len(self) -> int:
        return self.tokens.shape[1]

    def _map_tensors(self, fn) -> PackedBatch:
        return replace(
            self,
            **{
                f.name: fn(getattr(self, f.name))
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def select_rows(self, idx: Sequence[int] | torch.Tensor) -> PackedBatch:
        """The rows ``idx`` as a batch of their own (for micro-batching); stats recomputed."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = self._map_tensors(lambda t: t.index_select(0, idx.to(t.device)))
        out.stats = _compute_stats(out)
        return out

    def trimmed(self, multiple: int) -> PackedBatch:
        """The batch cut after its last non-padding position, rounded up to a multiple of
        ``multiple`` (the attention block size), so a partly filled row does not compute a
        whole ``row_len``. Exact: trailing padding is visible to no token. Stats unchanged.

        Raises:
            ValueError: ``multiple`` < 1.
        """
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        used = (self.group_ids != PAD_GROUP).any(dim=0).nonzero()
        end = int(used[-1]) + 1 if used.numel() else 1
        end = min(self.row_len, -(-end // multiple) * multiple)
        if end == self.row_len:
            return self
        out = self._map_tensors(lambda t: t[:, :end])
        out.stats = self.stats
        return out

    def to(self, device: torch.device | str) -> PackedBatch:
        return self._map_tensors(lambda t: t.to(device))


def pack_groups(
    groups: Sequence[GroupRollout],
    row_len: int,
    *,
    truncate: bool = False,
    pad_id: int = 0,
) -> PackedBatch:
    """Pack ``groups`` into rows of ``row_len`` tokens (first-fit decreasing).

    Each group's completions are packed with their token ids and behaviour logprobs, and the
    group's ``advantages`` and ``loss_weights`` (one per completion) are spread over their
    tokens.

    A group whose prompt and completions fit in one row is kept together. A larger group
    is split into chunks (its prompt repeated in each) by first-fit decreasing over its
    completions; the chunks are then packed into rows by first-fit decreasing, several
    groups per row. A prompt+completion longer than ``row_len`` raises ValueError unless
    ``truncate=True``, which cuts the completion to fit (its tail is not trained).
    """
    if row_len < 2:
        raise ValueError(f"row_len must be at least 2, got {row_len}")
    groups = list(groups)
    completions = _validated_completions(groups, row_len, truncate)  # per group: list of (j, len)

    lens = {g: dict(c) for g, c in enumerate(completions)}  # group -> {completion: length}

    # 1. Chunks: (group index, [completion indices]), each fitting in one row with its prompt.
    chunks: list[tuple[int, list[int]]] = []
    for g, comps in enumerate(completions):
        capacity = row_len - len(groups[g].prompt_ids)
        bins = _first_fit_decreasing([j for j, _ in comps], lens[g].__getitem__, capacity)
        chunks += [(g, sorted(b)) for b in bins]

    # 2. Rows: first-fit decreasing over chunk sizes (ties keep group order).
    def chunk_len(chunk: tuple[int, list[int]]) -> int:
        g, js = chunk
        return len(groups[g].prompt_ids) + sum(lens[g][j] for j in js)

    rows = _first_fit_decreasing(chunks, chunk_len, row_len)

    # 3. Fill tensors.
    R, S = len(rows), row_len
    seq_offset = [0]
    for grp in groups:
        seq_offset.append(seq_offset[-1] + grp.group_size)
    t = {
        "tokens": torch.full((R, S), pad_id, dtype=torch.long),
        "positions": torch.zeros(R, S, dtype=torch.long),
        "group_ids": torch.full((R, S), PAD_GROUP, dtype=torch.long),
        "parent_ids": torch.full((R, S), PAD_GROUP, dtype=torch.long),
        "trained": torch.zeros(R, S, dtype=torch.bool),
        "pred_pos": torch.arange(S).repeat(R, 1),
        "behaviour_logprobs": torch.zeros(R, S),
        "advantages": torch.zeros(R, S),
        "loss_weights": torch.zeros(R, S),
        "seq_ids": torch.full((R, S), -1, dtype=torch.long),
    }
    segment = 0
    for r, row in enumerate(rows):
        at = 0
        for g, js in sorted(row, key=lambda c: c[0]):  # group order inside a row: readable
            grp = groups[g]
            P = len(grp.prompt_ids)
            prompt_seg = segment
            segment += 1
            t["tokens"][r, at : at + P] = torch.tensor(grp.prompt_ids)
            t["positions"][r, at : at + P] = torch.arange(P)
            t["group_ids"][r, at : at + P] = prompt_seg
            t["parent_ids"][r, at : at + P] = prompt_seg
            last_prompt = at + P - 1
            at += P
            for j in js:
                n = lens[g][j]
                sl = slice(at, at + n)
                completion = grp.completions[j]
                t["tokens"][r, sl] = torch.tensor(completion.token_ids[:n])
                t["positions"][r, sl] = torch.arange(P, P + n)
                t["group_ids"][r, sl] = segment
                t["parent_ids"][r, sl] = prompt_seg
                t["trained"][r, sl] = True
                # first token <- last prompt token; later tokens <- previous tail token
                t["pred_pos"][r, sl] = torch.arange(at - 1, at + n - 1)
                t["pred_pos"][r, at] = last_prompt
                t["behaviour_logprobs"][r, sl] = torch.tensor(
                    completion.logprobs[:n], dtype=torch.float32
                )
                t["advantages"][r, sl] = float(grp.advantages[j])
                t["loss_weights"][r, sl] = float(grp.loss_weights[j])
                t["seq_ids"][r, sl] = seq_offset[g] + j
                segment += 1
                at += n
    batch = PackedBatch(**t, stats=None)  # type: ignore[arg-type]
    batch.stats = _compute_stats(batch)
    return batch


def _first_fit_decreasing(items: list[T], size: Callable[[T], int], capacity: int) -> list[list[T]]:
    """Bins of ``items`` (each bin's total size <= capacity), filled first-fit in order of
    decreasing size; equal sizes keep their input order."""
    bins: list[list[T]] = []
    free: list[int] = []
    for item in sorted(items, key=lambda it: -size(it)):
        n = size(item)
        for b in range(len(bins)):
            if free[b] >= n:
                bins[b].append(item)
                free[b] -= n
                break
        else:
            bins.append([item])
            free.append(capacity - n)
    return bins


def _validated_completions(
    groups: list[GroupRollout], row_len: int, truncate: bool
) -> list[list[tuple[int, int]]]:
    """Per group, (completion index, length to pack) for its non-empty completions."""
    out = []
    for g, grp in enumerate(groups):
        G = grp.group_size
        for name in ("advantages", "loss_weights"):
            if len(getattr(grp, name)) != G:
                raise ValueError(
                    f"group {g}: {name} has {len(getattr(grp, name))} entries but there are "
                    f"{G} completions; give one entry per completion"
                )
        P = len(grp.prompt_ids)
        if P == 0:
            raise ValueError(f"group {g}: prompt_ids is empty; a completion needs a prompt token")
        if P >= row_len:
            raise ValueError(
                f"group {g}: prompt has {P} tokens, row_len is {row_len}; a row must hold the "
                f"prompt and at least one completion token: raise row_len above {P}"
            )
        comps = []
        for j, completion in enumerate(grp.completions):
            n = len(completion.token_ids)
            if len(completion.logprobs) != n:
                raise ValueError(
                    f"group {g}, completion {j}: {n} tokens but {len(completion.logprobs)} "
                    "behaviour logprobs; give one per token"
                )
            if P + n > row_len:
                if not truncate:
                    raise ValueError(
                        f"group {g}, completion {j}: prompt ({P}) + completion ({n}) = {P + n} "
                        f"tokens exceeds row_len={row_len}; raise row_len to at least {P + n}, "
                        f"cap the sampler's max new tokens at {row_len - P}, or pass truncate=True"
                    )
                n = row_len - P
            if n > 0:
                comps.append((j, n))
        out.append(comps)
    return out


def _compute_stats(batch: PackedBatch) -> PackingStats:
    """Stats from the tensors alone, so they stay right for ``select_rows``."""
    R, S = batch.tokens.shape
    seq = batch.seq_ids[batch.trained]
    # a tail's first position equals its prompt length (positions continue the prompt)
    ids, counts = torch.unique(seq, return_counts=True)
    first_pos = torch.full((int(seq.max()) + 1 if seq.numel() else 0,), 0, dtype=torch.long)
    if seq.numel():
        first_pos.scatter_reduce_(
            0, seq, batch.positions[batch.trained], reduce="amin", include_self=False
        )
    seq_lens = first_pos[ids] + counts  # prompt + completion per sequence
    padded = int(seq_lens.max()) * len(ids) if len(ids) else 0
    positions = R * S
    return PackingStats(
        rows=R,
        row_len=S,
        sequences=len(ids),
        trained_tokens=int(batch.trained.sum()),
        tokens=int((batch.group_ids != PAD_GROUP).sum()),
        positions=positions,
        padded_positions=padded,
        unshared_positions=int(seq_lens.sum()),
        saved_fraction=1.0 - positions / padded if padded else 0.0,
    )
