"""Loading a user's rows: JSONL, parquet or a local Hugging Face ``datasets`` directory.

Rows come back as plain dicts with the task's column names: ``columns`` maps task names to
the file's names (``{"prompt": "question", "answer": "solution"}``). A missing column or a
bad row raises ``ValueError`` naming the file, the row and the config key to fix.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from packrl.tasks.base import Row


def read_rows(path: str | Path, split: str | None = None) -> list[Row]:
    """Reads every row of a ``.jsonl`` file, a ``.parquet`` file or a ``datasets`` directory.

    ``split`` picks a split of a saved ``DatasetDict`` (default: "train" if it has one).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"dataset {str(path)!r} does not exist; check the task's path")
    if path.is_dir():
        return _read_datasets_dir(path, split)
    if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(
                f"reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)"
            ) from e
        return pq.read_table(path).to_pylist()
    raise ValueError(
        f"dataset {str(path)!r}: unknown format; use .jsonl, .parquet or a directory saved "
        "with datasets' save_to_disk"
    )


def _read_jsonl(path: Path) -> list[Row]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def _read_datasets_dir(path: Path, split: str | None) -> list[Row]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"reading the directory {path} needs the datasets package: pip install datasets "
            "(or export the data to JSONL)"
        ) from e
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        names = list(data.keys())
        split = split or ("train" if "train" in data else None)
        if split not in data:
            raise ValueError(
                f"dataset {path}: split {split!r} not found; set split to one of {names}"
            )
        data = data[split]
    return [dict(row) for row in data]


def map_columns(rows: Sequence[Row], columns: dict[str, str] | None, source: str) -> list[Row]:
    """Renames the file's columns to the task's (``columns``: task name -> file name)."""
    if not columns:
        return [dict(r) for r in rows]
    out = []
    for i, row in enumerate(rows):
        new = dict(row)
        for ours, theirs in columns.items():
            if theirs not in row:
                raise ValueError(
                    f"{source}: row {i} has no column {theirs!r} (mapped to {ours!r} in the "
                    f"task's columns); its columns are {sorted(row)}"
                )
            new[ours] = row[theirs]
        out.append(new)
    return out


def check_column(
    rows: Sequence[Row],
    name: str,
    source: str,
    check: Callable[[Any], bool] | None = None,
    expected: str = "",
) -> None:
    """Raises naming the first row that lacks ``name`` or whose value fails ``check``."""
    for i, row in enumerate(rows):
        if name not in row:
            raise ValueError(
                f"{source}: row {i} has no {name!r} column; its columns are {sorted(row)}. "
                f"Map a column to it with columns: {{{name}: <your column>}}"
            )
        if check is not None and not check(row[name]):
            raise ValueError(
                f"{source}: row {i}, column {name!r}: expected {expected}, "
                f"got {type(row[name]).__name__} {str(row[name])[:80]!r}"
            )


def build_messages(
    rows: Sequence[Row], source: str, prompt_template: str, system_prompt: str | None
) -> list[Row]:
    """Adds ``"messages"`` to rows that have a ``"prompt"`` string (rows with messages keep them).

    ``prompt_template`` is a ``str.format`` template over the row's columns, e.g.
    ``"{prompt}\\nPut your final answer in \\\\boxed{{}}."``.
    """
    out = []
    for i, row in enumerate(rows):
        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in msgs
            ):
                raise ValueError(
                    f"{source}: row {i}, column 'messages': expected a list of "
                    "{'role': ..., 'content': ...} dicts"
                )
            out.append(dict(row))
            continue
        check_column(
            [row], "prompt", f"{source} (row {i})", lambda v: isinstance(v, str), "a string"
        )
        try:
            content = prompt_template.format(**row)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"{source}: row {i}: prompt_template {prompt_template!r} failed ({e}); "
                "it may use the row's columns in braces, and literal braces doubled ({{}})"
            ) from e
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        out.append({**row, "messages": messages})
    return out


def split_rows(rows: Sequence[Row], n_eval: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Shuffles by ``seed`` and holds out ``n_eval`` rows: (train, eval), never overlapping."""
    if n_eval >= len(rows):
        raise ValueError(f"n_eval={n_eval} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_task_rows(
    path: str | Path,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    prompt_template: str = "{prompt}",
    system_prompt: str | None = None,
) -> list[Row]:
    """``read_rows`` + ``map_columns`` + ``build_messages``: rows ready for a ``Task``."""
    source = str(path) + (f" [{split}]" if split else "")
    rows = map_columns(read_rows(path, split), columns, source)
    if not rows:
        raise ValueError(f"{source}: no rows")
    return build_messages(rows, source, prompt_template, system_prompt)
