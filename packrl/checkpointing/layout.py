"""Where a run's checkpoints live: ``out_dir/step_N/`` dirs, the ``out_dir/latest`` pointer,
and the names of the files inside a step dir."""

import re
from pathlib import Path

FORMAT_VERSION = 1
META_FILE = "packrl_checkpoint.json"  # written last: a step dir with it is complete
STATE_FILE = "training_state.pt"
CONFIG_FILE = "run_config.yaml"
LATEST_FILE = "latest"
HF_INDEX_FILE = "model.safetensors.index.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, does not fit the model, or could not be
    written (full disk)."""


def step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """``(N, out_dir/step_N)`` for every step dir, complete or not, by increasing N."""
    found = []
    for p in out_dir.iterdir() if out_dir.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The step dir ``out_dir/latest`` points at, or None when no checkpoint was saved yet."""
    pointer = Path(out_dir).expanduser() / LATEST_FILE
    if not pointer.is_file():
        return None
    step_dir = pointer.parent / pointer.read_text().strip()
    if not _STEP_DIR.match(step_dir.name) or not (step_dir / META_FILE).is_file():
        raise CheckpointError(
            f"{pointer} points at {step_dir.name!r}, which is not a complete checkpoint "
            f"(no {META_FILE}); point it at an existing step_N dir or delete it"
        )
    return step_dir


def resolve_step_dir(path: Path) -> Path:
    """``path`` itself if it is a step dir, else the one its ``latest`` names."""
    if (path / META_FILE).is_file():
        return path
    step_dir = latest_checkpoint(path)
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a step_N dir with {META_FILE}, or an output "
            f"dir with a {LATEST_FILE!r} file"
        )
    return step_dir


def previous_checkpoint_hint(step_dir: Path) -> str:
    """How to fall back from a bad ``step_dir`` to the newest complete one before it."""
    m = _STEP_DIR.match(step_dir.name)
    earlier = [
        p
        for n, p in step_dirs(step_dir.parent)
        if m and n < int(m.group(1)) and (p / META_FILE).is_file()
    ]
    if not earlier:
        return f"there is no earlier complete checkpoint in {step_dir.parent}"
    prev = earlier[-1]
    return (
        f"the previous complete checkpoint is {prev}: to resume from it, write "
        f"'{prev.name}' into {step_dir.parent / LATEST_FILE} (or move {step_dir.name} away)"
    )
