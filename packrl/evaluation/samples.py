"""Every sample of an evaluation on disk, one JSON line each, and resuming from them.

``<output_dir>/samples/<model name>.jsonl`` gets one line per sample, written a prompt's group
at a time and flushed, so a killed evaluation loses at most the chunk it was generating.
``<model name>.meta.json`` beside it records what the samples were drawn with (weights,
task rows, sampling, seed, rewards); resuming with anything else is an error that names
what changed, never a silent mix.

A line::

    {"prompt_index": 3, "prompt_id": "tc-p1-1000003", "sample": 0, "difficulty": 1,
     "completion": "...", "token_ids": [...], "num_tokens": 57, "finished": true,
     "reward": 0.67, "rewards": {"temporal_clue_reward": 0.67}, "accuracy": 0.67,
     "correct": false, "reward_failures": {"temporal_clue_reward": 0},
     "questions": [{"letter": "A", "kind": "who", "expected": "...", "given": "...",
                    "correct": true}, ...]}

``questions`` is present for rows with a Temporal Clue answer key only.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from packrl.evaluation.metrics import is_correct
from packrl.evaluation.questions import question_grades
from packrl.rollout.base import Completion
from packrl.rollout.group import GroupRollout
from packrl.training.config_schema import ConfigError


def sample_records(
    groups: Sequence[GroupRollout], difficulty_column: str | None = None
) -> list[dict[str, Any]]:
    """One record per sample of each group (see the module docstring)."""
    out = []
    for g in groups:
        for j, c in enumerate(g.completions):
            record: dict[str, Any] = {
                "prompt_index": g.index,
                "prompt_id": str(g.row.get("id", g.index)),
                "sample": j,
                "difficulty": g.row.get(difficulty_column) if difficulty_column else None,
                "completion": c.text,
                "token_ids": list(c.token_ids),
                "num_tokens": len(c.token_ids),
                "finished": c.finished,
                "reward": g.reward[j],
                "rewards": {name: values[j] for name, values in g.rewards.items()},
                "accuracy": g.accuracy[j],
                "correct": is_correct(g.accuracy[j]),
                "reward_failures": dict(g.reward_failures),
            }
            questions = question_grades(g.row, c.text)
            if questions is not None:
                record["questions"] = questions
            out.append(record)
    return out


def _group(records: list[dict[str, Any]], row: dict, prompt_ids: list[int]) -> GroupRollout:
    """A scored group back from its saved records (sorted by sample). The completions carry
    no behaviour logprobs: evaluation never reads them."""
    names = list(records[0]["rewards"])
    return GroupRollout(
        prompt_ids=list(prompt_ids),
        completions=[
            Completion(list(r["token_ids"]), [], bool(r["finished"]), r["completion"])
            for r in records
        ],
        index=int(records[0]["prompt_index"]),
        row=row,
        rewards={name: [float(r["rewards"][name]) for r in records] for name in names},
        reward=[float(r["reward"]) for r in records],
        accuracy=[float(r["accuracy"]) for r in records],
        reward_failures=dict(records[0]["reward_failures"]),
    )


class SampleStore:
    """The samples file of one model, and its settings.

    Args:
        path: the ``.jsonl`` file (``.meta.json`` beside it).
        settings: plain values that fix the samples (weights, rows, sampling, seed, rewards).
        resume: keep the groups saved under the same settings; False starts over.
    """

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool) -> None:
        self.path = Path(path)
        self.meta_path = self.path.with_suffix(".meta.json")
        self.settings = json.loads(json.dumps(settings))  # plain JSON values, as saved
        self.resume = resume

    def load(
        self, rows: Sequence[dict], prompt_ids: Sequence[list[int]], num_samples: int
    ) -> dict[int, GroupRollout]:
        """The complete groups saved before (by row position), and a clean file holding only
        them; an empty file when not resuming or nothing was saved.

        Raises:
            ConfigError: the saved samples were drawn with other settings (the error lists
                the differences and the two ways out), or the file is corrupt mid-way.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.resume or not self.meta_path.is_file():
            self._start_over()
            return {}
        saved = json.loads(self.meta_path.read_text())
        changed = sorted(
            k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k)
        )
        if changed:
            details = "; ".join(
                f"{k}: saved {saved.get(k)!r}, now {self.settings.get(k)!r}" for k in changed
            )
            raise ConfigError(
                f"{self.path} holds samples drawn with other settings ({details}). Set "
                "resume: false to replace them, or use another output_dir"
            )
        by_prompt: dict[int, list[dict]] = defaultdict(list)
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines):
                    break  # the line being written when the run was killed
                raise ConfigError(
                    f"{self.path} line {n} is not JSON ({e}); set resume: false to start over"
                ) from e
            by_prompt[int(record["prompt_index"])].append(record)
        done = {}
        for i, records in by_prompt.items():
            records.sort(key=lambda r: r["sample"])
            if i < len(rows) and [r["sample"] for r in records] == list(range(num_samples)):
                done[i] = _group(records, rows[i], prompt_ids[i])
        self._rewrite([r for i in sorted(done) for r in by_prompt[i]])
        return done

    def append(self, groups: Sequence[GroupRollout], difficulty_column: str | None) -> None:
        with self.path.open("a") as f:
            for record in sample_records(groups, difficulty_column):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _start_over(self) -> None:
        self._rewrite([])
        self.meta_path.write_text(json.dumps(self.settings, indent=2) + "\n")

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        os.replace(tmp, self.path)
