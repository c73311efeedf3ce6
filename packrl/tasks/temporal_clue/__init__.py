"""Temporal Clue: Clue-style murder mysteries over time and space, generated with CP-SAT.

See docs/temporal_clue.md. Main entry points: `make_config` / `PRESETS` (the knobs),
`generate_puzzle` (one record), `audit` (answer shortcuts), `select_balanced` (files
without them), `recheck` (independent check),
`grade` / `temporal_clue_reward` (grading), `read_puzzles` / `write_puzzles` (files) and
`temporal_clue_task` (a `Task` for the recipe).
"""

from packrl.tasks.temporal_clue.audit import audit
from packrl.tasks.temporal_clue.balance import select_balanced
from packrl.tasks.temporal_clue.clues import FAMILIES, clue_text, holds
from packrl.tasks.temporal_clue.config import PRESETS, PuzzleConfig, make_config, preset
from packrl.tasks.temporal_clue.files import PuzzleFileError, read_puzzles, write_puzzles
from packrl.tasks.temporal_clue.generate import GENERATOR_VERSION, SCHEMA_VERSION, generate_puzzle
from packrl.tasks.temporal_clue.grader import (
    grade,
    normalize,
    parse_answers,
    temporal_clue_format_reward,
    temporal_clue_reward,
)
from packrl.tasks.temporal_clue.recheck import recheck
from packrl.tasks.temporal_clue.scenario import SIZES, World
from packrl.tasks.temporal_clue.task import puzzle_rows, temporal_clue_task

__all__ = [
    "FAMILIES",
    "GENERATOR_VERSION",
    "PRESETS",
    "SCHEMA_VERSION",
    "SIZES",
    "PuzzleConfig",
    "audit",
    "select_balanced",
    "make_config",
    "preset",
    "recheck",
    "PuzzleFileError",
    "World",
    "clue_text",
    "generate_puzzle",
    "grade",
    "holds",
    "normalize",
    "parse_answers",
    "puzzle_rows",
    "read_puzzles",
    "temporal_clue_format_reward",
    "temporal_clue_reward",
    "temporal_clue_task",
    "write_puzzles",
]
