"""Reading and writing puzzle files.

Two formats are read:
- our JSONL, one generated record per line (`generate.generate_puzzle`);
- the public Temporal Clue JSON format: a list of ``{"prompt", "solution", "num_clues"}``
  objects, with ``solution`` mapping question letters to answers.
Every record must have a non-empty string ``prompt`` and a non-empty ``solution`` dict of
single-letter keys to string answers; anything else is an error naming the record and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class PuzzleFileError(ValueError):
    pass


def _check(rec: Any, where: str) -> Record:
    if not isinstance(rec, dict):
        raise PuzzleFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PuzzleFileError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r:.60}")  # fmt: skip
    sol = rec.get("solution")
    if not isinstance(sol, dict) or not sol:
        raise PuzzleFileError(
            f"{where}: field 'solution' must be a non-empty object mapping question letters "
            f'to answers, e.g. {{"A": "Miss Scarlett"}}; got {sol!r:.60}'
        )
    for k, v in sol.items():
        if not (isinstance(k, str) and len(k) == 1 and k.isalpha()):
            raise PuzzleFileError(f"{where}: field 'solution' has key {k!r}; keys must be single letters")  # fmt: skip
        if not isinstance(v, str) or not v.strip():
            raise PuzzleFileError(f"{where}: field 'solution.{k}' must be a non-empty string, got {v!r}")  # fmt: skip
    n = rec.get("num_clues")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise PuzzleFileError(f"{where}: field 'num_clues' must be a non-negative integer, got {n!r}")  # fmt: skip
    return rec


def read_puzzles(path: str | Path) -> list[Record]:
    """All puzzle records in a JSONL file or a public-format JSON list, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"puzzle file {path} not found (generate one with tools/generate_puzzles.py)")  # fmt: skip
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PuzzleFileError(f"{path}: not valid JSON ({e})") from None
        records = [_check(r, f"{path} record {i}") for i, r in enumerate(items)]
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} record {len(records)} (line {n})"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PuzzleFileError(f"{where}: not valid JSON ({e})") from None
            records.append(_check(rec, where))
    if not records:
        raise PuzzleFileError(f"{path}: no puzzles in file")
    return records


def dumps_record(rec: Record) -> str:
    """One JSONL line; the same record always gives the same bytes."""
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":"))


def write_puzzles(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSONL; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(dumps_record(rec) + "\n")
            n += 1
    return n
