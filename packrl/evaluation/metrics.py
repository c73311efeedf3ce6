"""The evaluation's numbers, computed from scored groups (``GroupRollout``, one per problem).

Every number is defined in docs/evaluation.md. The headline ones are the training recipe's
(``packrl.training.metrics.rollout_metrics``: mean reward, accuracy, completion length, share
truncated), so a training run's eval and the eval recipe report the same quantities; this adds
pass@k, a breakdown by difficulty and, for Temporal Clue, by question.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from packrl.evaluation.pass_at_k import default_ks, mean_pass_at_k
from packrl.evaluation.questions import question_grades
from packrl.rollout.group import GroupRollout
from packrl.training.metrics import rollout_metrics

# Row columns that name a problem's difficulty, in the order "auto" tries them: Temporal
# Clue's number of players, a generic level, arithmetic's difficulty setting.
DIFFICULTY_COLUMNS = ("players", "level", "difficulty")


def is_correct(accuracy: float) -> bool:
    """A sample counts as correct for pass@k when its accuracy is 1: every test passed,
    every question right (Temporal Clue's partial credit below 1 is not a pass)."""
    return accuracy >= 1.0


def difficulty_column(rows: Sequence[dict[str, Any]], key: str | None = "auto") -> str | None:
    """The row column the breakdown uses: ``key`` itself, or with "auto" the first of
    ``DIFFICULTY_COLUMNS`` that every row has (not None); None for no breakdown."""
    if key != "auto":
        return key
    for column in DIFFICULTY_COLUMNS:
        if rows and all(r.get(column) is not None for r in rows):
            return column
    return None


def _pass_counts(groups: Sequence[GroupRollout]) -> list[tuple[int, int]]:
    return [(g.group_size, sum(is_correct(a) for a in g.accuracy)) for g in groups]


def _summary(groups: Sequence[GroupRollout], ks: Sequence[int]) -> dict[str, float]:
    """Headline numbers of a set of groups: rollout_metrics plus pass@k."""
    out = rollout_metrics(groups)
    out["prompts"] = float(len(groups))
    has_accuracy = not any(math.isnan(a) for g in groups for a in g.accuracy)
    counts = _pass_counts(groups)
    for k in ks:
        out[f"pass@{k}"] = mean_pass_at_k(counts, k) if has_accuracy else float("nan")
    return out


def sort_key(value: str) -> tuple[int, float | str]:
    """Numeric difficulty values in numeric order, then the others alphabetically."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def eval_metrics(
    groups: Sequence[GroupRollout],
    ks: Sequence[int] | None = None,
    difficulty_key: str | None = "auto",
) -> dict[str, Any]:
    """All numbers of one model's evaluation.

    Args:
        groups: scored groups, all with the same number of samples n.
        ks: the k of pass@k (each 1 <= k <= n); default ``default_ks(n)``.
        difficulty_key: the row column to break down by ("auto": see ``difficulty_column``;
            None: no breakdown).

    Returns:
        ``rollout_metrics`` (reward/mean, reward/std, reward/<func>/mean, accuracy,
        completion_len/mean|min|max, truncated_frac), ``prompts``, ``samples_per_prompt``,
        ``pass@k`` for each k, and two nested sections: ``by_difficulty`` (column value ->
        the same headline numbers for its problems, with ``column`` naming the column) and
        ``by_question`` (question kind -> ``questions`` graded and ``accuracy``; Temporal Clue
        rows only, else empty).

    Raises:
        ValueError: groups with different sample counts, or a k outside 1..n.
    """
    if not groups:
        return {}
    sizes = {g.group_size for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups have different sample counts {sorted(sizes)}; give one n")
    n = sizes.pop()
    ks = default_ks(n) if ks is None else sorted(set(ks))
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"pass@k: every k must be in 1..{n} (the samples drawn), got {ks}")
    out: dict[str, Any] = {**_summary(groups, ks), "samples_per_prompt": float(n)}

    column = difficulty_column([g.row for g in groups], difficulty_key)
    by_level: dict[str, list[GroupRollout]] = defaultdict(list)
    if column is not None:
        for g in groups:
            by_level[str(g.row.get(column))].append(g)
    out["by_difficulty"] = {
        "column": column,
        "levels": {v: _summary(by_level[v], ks) for v in sorted(by_level, key=sort_key)},
    }

    right: dict[str, list[bool]] = defaultdict(list)
    for g in groups:
        for c in g.completions:
            for q in question_grades(g.row, c.text) or []:
                right[q["kind"]].append(bool(q["correct"]))
    out["by_question"] = {
        kind: {"questions": float(len(v)), "accuracy": sum(v) / len(v)}
        for kind, v in sorted(right.items())
    }
    return out
