"""Start-up checks of a task's rows, so no run dies at step N on a row it could check at 0."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from tqdm.auto import tqdm

from packrl.tasks.base import Row, Task

log = logging.getLogger(__name__)

LONG_PROMPTS = ("error", "skip")


class TaskDataError(ValueError):
    """A task's rows cannot be trained on as configured."""


def check_task_rows(
    task: Task,
    prompt_len: Callable[[Row], int],
    *,
    max_new_tokens: int,
    row_len: int,
    prompts_per_step: int,
    long_prompts: str = "error",
) -> Task:
    """Check every row of ``task`` before training and return the task to train on.

    - A training prompt whose ``prompt_len(row)`` tokens plus ``max_new_tokens`` exceed
      ``row_len`` cannot be packed: with ``long_prompts="error"`` a ``TaskDataError`` names the task, the
      split, the row, its length and the keys to change; with ``"skip"`` such rows are dropped
      with one warning that counts them.
    - ``task.validate_rows`` (when the task has one) must give None for every row; the
      first failures are raised together (e.g. a gold answer that does not parse).
    - Fewer training rows than ``prompts_per_step``: a warning that rows repeat in a step.

    Raises:
        TaskDataError: as above, or when no training row is left.
    """
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {LONG_PROMPTS}, got {long_prompts!r}")
    limit = row_len - max_new_tokens
    kept: dict[str, list[Row]] = {}
    problems: list[str] = []
    too_long: list[tuple[int, int, Row]] = []  # (tokens, train row index, row)
    for split, rows in (("train", task.train), ("eval", task.eval)):
        kept[split] = []
        bar = tqdm(rows, desc=f"checking {split} rows", disable=len(rows) < 5000, leave=False)
        if task.validate_rows is not None:
            for i, why in enumerate(task.validate_rows(rows)):
                if why is not None:
                    problems.append(f"task {task.name!r}, {split} row {i}: {why}")
        for i, row in enumerate(bar):
            n = prompt_len(row) if split == "train" else 0  # eval rows are never packed
            if n <= limit:
                kept[split].append(row)
            else:
                too_long.append((n, i, row))
    skipped = len(too_long) if long_prompts == "skip" else 0
    if too_long and not skipped:
        n, i, row = max(too_long, key=lambda t: t[0])
        problems.append(
            f"task {task.name!r}: {len(too_long)} train rows do not fit a packed row, their prompt "
            f"+ grpo.max_new_tokens ({max_new_tokens}) > packing.row_len ({row_len}); the "
            f"longest is train row {i} ({_preview(row)}), {n} prompt tokens. Raise "
            f"packing.row_len to at least {n + max_new_tokens}, lower grpo.max_new_tokens, or "
            "set packing.long_prompts: skip to drop such rows"
        )
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise TaskDataError("bad task rows:\n  - " + "\n  - ".join(problems[:10]) + more)
    if skipped:
        log.warning(
            "task %r: skipped %d rows whose prompt + grpo.max_new_tokens (%d) exceeds "
            "packing.row_len (%d) (packing.long_prompts: skip)",
            task.name,
            skipped,
            max_new_tokens,
            row_len,
        )
    if not kept["train"]:
        raise TaskDataError(f"task {task.name!r}: no training row fits packing.row_len={row_len}")
    if len(kept["train"]) < prompts_per_step:
        log.warning(
            "task %r has %d training rows, fewer than grpo.prompts_per_step=%d: rows repeat "
            "within a step",
            task.name,
            len(kept["train"]),
            prompts_per_step,
        )
    if not skipped:
        return task
    return dataclasses.replace(task, train=kept["train"], eval=kept["eval"])


def _preview(row: Row, chars: int = 50) -> str:
    text = " ".join(str(row["messages"][-1].get("content", "")).split())
    return repr(text[:chars] + ("..." if len(text) > chars else ""))
