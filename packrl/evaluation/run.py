"""Evaluate a sampler on rows: the one code path of the eval recipe and the GRPO recipe's eval.

    groups = evaluate_prompts(sampler, scorer, rows, prompt_ids, seed=seed, max_new_tokens=64)
    numbers = eval_metrics(groups)

Rows go through ``collect_rollouts`` (sharded generate, score, gather) in chunks of prompts,
so an interrupted evaluation can keep what finished (``on_groups``) and resume without it
(``done``). Prompt ``i`` always samples with ``eval_seed(seed, i)`` and the sampler draws
each sequence from its own stream, so chunking, resuming and the number of ranks do not
change the samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from packrl.rewards import TrainerState
from packrl.rollout.base import Sampler
from packrl.rollout.collect import GroupScorer, collect_rollouts, prompt_seed
from packrl.rollout.group import GroupRollout

# Prompts per chunk when the sampler does not say how many sequences it decodes at once.
DEFAULT_CHUNK_SEQUENCES = 64


def eval_seed(seed: int, index: int) -> int:
    """The sampling seed of evaluation prompt ``index``: the GRPO recipe's per-prompt seed at
    step -1 (``prompt_seed(seed, -1, index)``)."""
    return prompt_seed(seed, -1, index)


def chunk_size(sampler: Sampler, num_samples: int) -> int:
    """Prompts per chunk: as many as fill one of the sampler's batches (its
    ``max_batch_size`` sequences), so chunking adds no sampler call."""
    sequences = getattr(sampler, "max_batch_size", None) or DEFAULT_CHUNK_SEQUENCES
    return max(1, sequences // num_samples)


def evaluate_prompts(
    sampler: Sampler,
    scorer: GroupScorer,
    rows: Sequence[dict[str, Any]],
    prompt_ids: Sequence[list[int]],
    *,
    seed: int,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    trainer_state: TrainerState | None = None,
    prompts_per_chunk: int | None = None,
    done: Mapping[int, GroupRollout] | None = None,
    on_groups: Callable[[list[GroupRollout]], None] | None = None,
    progress: tqdm | None = None,
) -> list[GroupRollout]:
    """Sample ``num_samples`` completions per row (``temperature=0``: greedy), score them,
    and return one ``GroupRollout`` per row, in row order (``index`` = row position).

    Args:
        rows, prompt_ids: the task rows and their prompt token ids (chat template applied).
        seed: prompt i samples with ``eval_seed(seed, i)``.
        trainer_state: passed to reward functions (default: step 0 of 0).
        prompts_per_chunk: prompts per ``collect_rollouts`` call (default ``chunk_size``).
        done: groups already evaluated, by row position (from saved samples); they are
            returned as they are and not sampled again.
        on_groups: called with each chunk's new groups (e.g. to save them) on every rank.
        progress: a tqdm bar advanced by the samples of each chunk.

    Every rank must call it with the same arguments (``collect_rollouts`` gathers).
    """
    if not len(rows) == len(prompt_ids):
        raise ValueError(f"{len(rows)} rows and {len(prompt_ids)} prompts: give one each")
    done = dict(done or {})
    state = trainer_state or TrainerState()
    todo = [i for i in range(len(rows)) if i not in done]
    step = prompts_per_chunk or chunk_size(sampler, num_samples)
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        rollouts = collect_rollouts(
            sampler,
            scorer,
            [rows[i] for i in chunk],
            [prompt_ids[i] for i in chunk],
            [eval_seed(seed, i) for i in chunk],
            state,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
        )
        for g in rollouts.groups:  # collect_rollouts numbers them within the chunk
            g.index = chunk[g.index]
            done[g.index] = g
        if on_groups is not None:
            on_groups(rollouts.groups)
        if progress is not None:
            progress.update(len(chunk) * num_samples)
    return [done[i] for i in sorted(done)]
