"""Checkpoints that other tools can load and that resume a run exactly, and the rules that
keep one run per output directory.

    layout.py      out_dir/step_N/, out_dir/latest, file names, CheckpointError
    save.py        save_checkpoint: HF safetensors / PEFT adapters + training state, atomic
    load.py        load_checkpoint (verifies every file's SHA-256), saved_config
    manifest.py    packrl_checkpoint.json: parameters, file sizes and checksums
    rng.py         the RNG states saved for an exact resume
    run_dir.py     claim_output_dir: a lock and the fresh-run/resume/overwrite rule
    config_diff.py config_changes: what a resume's config changed, and which changes are errors

The torchtune <-> HF/PEFT key conversion lives in ``packrl.models.convert``; the atomic
directory write in ``packrl.atomic_dir``. See docs/checkpointing.md.
"""

from packrl.checkpointing.config_diff import ConfigChangeError, ConfigDiff, config_changes
from packrl.checkpointing.layout import CheckpointError, latest_checkpoint
from packrl.checkpointing.load import load_checkpoint, saved_config
from packrl.checkpointing.run_dir import OutputDirError, RunLock, claim_output_dir
from packrl.checkpointing.save import save_checkpoint

__all__ = [
    "CheckpointError",
    "ConfigChangeError",
    "ConfigDiff",
    "OutputDirError",
    "RunLock",
    "claim_output_dir",
    "config_changes",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "saved_config",
]
