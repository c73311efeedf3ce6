"""`temporal_clue_task`: puzzle files -> a `Task` for the GRPO recipe.

Usable from a config::

    task:
      _component_: packrl.tasks.temporal_clue.temporal_clue_task
      train_path: puzzles/train.jsonl
      eval_path: puzzles/validation.jsonl
      players: [1, 2]        # optional: keep only these difficulties
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from packrl.tasks.base import Task
from packrl.tasks.temporal_clue.files import read_puzzles
from packrl.tasks.temporal_clue.grader import temporal_clue_format_reward, temporal_clue_reward

_REPO = Path(__file__).resolve().parents[3]


def _resolve(path: str | Path) -> Path:
    """A relative path is tried from the working directory, then from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (_REPO / p).exists():
        return p
    return _REPO / p


def puzzle_rows(path: str | Path, players: list[int] | None = None, limit: int | None = None,
                system_prompt: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Task rows from a puzzle file: ``messages``, ``solution``, ``id`` and ``players``.

    Public-format records have no ``players``; filtering by players then keeps none of them,
    so `players` must be left unset for such files.
    """
    rows = []
    for i, rec in enumerate(read_puzzles(_resolve(path))):
        if players is not None and rec.get("players") not in players:
            continue
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": rec["prompt"]})
        rows.append({
            "messages": messages,
            "solution": rec["solution"],
            "id": rec.get("id", f"{Path(path).name}:{i}"),
            "players": rec.get("players"),
        })  # fmt: skip
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no puzzles left after filtering by players={players}")
    return rows


def temporal_clue_task(
    train_path: str = "puzzles/train.jsonl",
    eval_path: str = "puzzles/validation.jsonl",
    players: list[int] | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    format_weight: float = 0.0,
    system_prompt: str | None = None,
) -> Task:
    """Temporal Clue as a `Task`.

    Rewards: the partial-credit grade (fraction of questions right), plus the format
    reward (fraction of questions with an answer line) when ``format_weight > 0``. The
    accuracy reported and used for evaluation is the partial-credit grade.
    """
    if format_weight < 0:
        raise ValueError(f"format_weight must be >= 0, got {format_weight}")
    players = list(players) if players is not None else None
    funcs, weights = [temporal_clue_reward], [1.0]
    if format_weight > 0:
        funcs.append(temporal_clue_format_reward)
        weights.append(float(format_weight))
    return Task(
        name="temporal_clue",
        train=puzzle_rows(train_path, players, max_train, system_prompt),
        eval=puzzle_rows(eval_path, players, max_eval, system_prompt),
        reward_funcs=funcs,
        reward_weights=weights,
        accuracy_func=temporal_clue_reward,
    )
