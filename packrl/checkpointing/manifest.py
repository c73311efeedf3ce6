"""The manifest ``packrl_checkpoint.json``: what a checkpoint holds, and a SHA-256 per file
so that a resume can prove the files are the ones that were saved.

SHA-256 because with the CPU's SHA extensions hashlib hashes it at about 1 GB/s, twice
BLAKE2b's rate here (measured by ``tools/bench_checkpoint.py``; docs/checkpointing.md).
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from packrl.checkpointing.layout import META_FILE, STATE_FILE, CheckpointError
from packrl.checkpointing.layout import previous_checkpoint_hint as _hint

log = logging.getLogger(__name__)

HASH = "sha256"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def describe_params(state_dict: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Parameter name -> ``{"shape", "dtype"}``, to check a model against a checkpoint."""
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in state_dict.items()
    }


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def file_checksums(step_dir: Path) -> dict[str, dict]:
    """``{file name: {"bytes": size, "sha256": hex}}`` for every file in ``step_dir`` but the
    manifest itself."""
    return {
        f.name: {"bytes": f.stat().st_size, HASH: file_digest(f)}
        for f in sorted(step_dir.iterdir())
        if f.is_file() and f.name != META_FILE
    }


def verify_files(step_dir: Path, meta: dict) -> None:
    """Check every file the manifest lists: present, same size, same SHA-256. The state file
    goes first (it is what a resume reads first). Raises CheckpointError naming the bad file
    and the previous complete checkpoint; a manifest without checksums (saved before packrl
    recorded them) is logged and loaded unverified."""
    checksums = meta.get("checksums")
    if checksums is None:
        log.info(
            f"checkpoint {step_dir} has no checksums (saved by an older packrl): loading it "
            "unverified"
        )
        return
    for name in sorted(checksums, key=lambda n: (n != STATE_FILE, n)):
        path, want = step_dir / name, checksums[name]
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {step_dir} is incomplete: {name} is missing; {_hint(step_dir)}"
            )
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"{path} is corrupt: {size} bytes, {want['bytes']} when it was saved "
                f"(truncated or overwritten); {_hint(step_dir)}"
            )
        if file_digest(path) != want[HASH]:
            raise CheckpointError(
                f"{path} is corrupt: its {HASH} differs from the one recorded when it was saved "
                f"(same size, so its contents changed); {_hint(step_dir)}"
            )


def read_manifest(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / META_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{step_dir / META_FILE} is corrupt: {e}") from e
