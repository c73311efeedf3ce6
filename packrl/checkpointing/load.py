"""Resume a run from a checkpoint written by ``save_checkpoint``.

Build the model and load the *source* weights as at the start of the run, build the
optimizer and scheduler, then call ``load_checkpoint``. For full fine-tuning it loads the
saved weights; under LoRA it loads the adapters on top of the (unchanged) base weights.
Every file is checked against the manifest's size and SHA-256 first.
"""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torchtune.modules.peft import get_adapter_state_dict

from packrl.checkpointing.layout import (
    CONFIG_FILE,
    FORMAT_VERSION,
    HF_INDEX_FILE,
    STATE_FILE,
    CheckpointError,
    previous_checkpoint_hint,
    resolve_step_dir,
)
from packrl.checkpointing.manifest import describe_params, read_manifest, verify_files
from packrl.checkpointing.rng import set_rng_state
from packrl.models.convert import hf_to_tune, read_hf_config
from packrl.training.distributed import shard_like


def _first(items: Iterable[str], n: int = 5) -> list[str]:
    return sorted(items)[:n]


def _check_params(meta: dict, model_sd: dict[str, torch.Tensor], step_dir: Path) -> None:
    saved = meta["params"]
    current = describe_params(model_sd)
    missing = set(current) - set(saved)
    unexpected = set(saved) - set(current)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {step_dir} is for a different model: parameters missing from it "
            f"{_first(missing)}, parameters the model lacks {_first(unexpected)} "
            f"(LoRA in checkpoint: {meta['lora']})"
        )
    wrong = [
        f"{k}: saved {saved[k]['shape']} {saved[k]['dtype']}, model {v['shape']} {v['dtype']}"
        for k, v in current.items()
        if v != saved[k]
    ]
    if wrong:
        raise CheckpointError(
            f"checkpoint {step_dir} does not fit the model ({len(wrong)} parameters differ "
            f"in shape or dtype): {wrong[:3]}"
        )


def _load_full_weights(step_dir: Path, meta: dict) -> dict[str, torch.Tensor]:
    index = step_dir / HF_INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    hf: dict[str, torch.Tensor] = {}
    for name in names:
        if not (step_dir / name).is_file():
            raise CheckpointError(f"checkpoint {step_dir} is incomplete: {name} is missing")
        try:
            hf.update(load_file(step_dir / name))
        except Exception as e:  # safetensors' own error names no file
            raise CheckpointError(
                f"{step_dir / name} is corrupt or truncated: {e}; "
                f"{previous_checkpoint_hint(step_dir)}"
            ) from e
    config = read_hf_config(step_dir)
    return hf_to_tune(hf, meta["model_type"], config)


def _shard_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The saved (whole) optimizer state, each per-parameter tensor laid out like its
    parameter (a shard of it under FSDP2). State keys are parameter indices in
    param_groups order, the same whatever the number of ranks."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, per_param in saved.get("state", {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointError(
                f"optimizer state has an entry for parameter {index!r}; the optimizer has "
                f"{len(params)} parameters (was the checkpoint saved for another model?)"
            )
        p = params[index]
        state[index] = {
            k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for k, v in per_param.items()
        }
    return {**saved, "state": state}


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict:
    """Restore a checkpoint saved by ``save_checkpoint`` into the given objects.

    ``path`` is a ``step_N`` dir or the ``out_dir`` (its ``latest`` is used). The model must
    already hold the source weights under LoRA (only adapters are loaded). Restores the
    weights, optimizer, LR scheduler, all RNG states and ``generators`` (same names as at
    save time). Returns ``{"step", "data_state", "path", "config"}`` (``config``: the run
    config saved with it, or None).

    Raises CheckpointError, naming the file and the previous complete checkpoint, when a file
    is missing, truncated or corrupt (its SHA-256 differs from the manifest's), and when the
    checkpoint does not fit the model, optimizer, scheduler or generators.
    """
    step_dir = resolve_step_dir(Path(path).expanduser())
    meta = read_manifest(step_dir)
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{step_dir} has checkpoint format {meta.get('format')}, this packrl reads "
            f"{FORMAT_VERSION}"
        )
    state_path = step_dir / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: {STATE_FILE} is missing")

    model_sd = model.state_dict()
    _check_params(meta, model_sd, step_dir)
    verify_files(step_dir, meta)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{state_path} is corrupt or unreadable: {e}") from e

    if meta["lora"]:
        weights = state["adapter"]
    else:
        if meta["adapter_only"]:
            raise CheckpointError(f"{step_dir} holds adapters only but the model has none")
        weights = _load_full_weights(step_dir, meta)
    expected = get_adapter_state_dict(model_sd) if meta["lora"] else model_sd
    differ = set(weights) ^ set(expected)
    if differ:
        raise CheckpointError(
            f"checkpoint {step_dir} weights do not match the model's keys: {_first(differ)}"
        )
    # Under FSDP2 each rank read the whole tensors and keeps its own shard of them.
    weights = {k: shard_like(v, model_sd[k]) for k, v in weights.items()}
    model.load_state_dict(weights, strict=not meta["lora"])

    for name, obj in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
        if obj is None:
            continue
        if state[name] is None:
            raise CheckpointError(
                f"checkpoint {step_dir} was saved without {name} state; cannot restore the "
                f"{name} passed to load_checkpoint"
            )
        saved = state[name]
        if name == "optimizer":
            saved = _shard_optimizer_state(saved, obj)
        try:
            obj.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {step_dir}: {name} state does not fit the {name} passed: {e}"
            ) from e
    set_rng_state(state["rng"], generators or {})
    return {
        "step": state["step"],
        "data_state": state["data_state"],
        "path": step_dir,
        "config": _read_config(step_dir),
    }


def _read_config(step_dir: Path) -> dict | None:
    path = step_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def saved_config(path: str | Path) -> dict | None:
    """The run config saved with a checkpoint (``path``: a step dir, or the out_dir whose
    ``latest`` is used), or None if it was saved without one. Verifies that file's checksum
    only, so it is cheap: call it before building the model to compare configs on resume."""
    step_dir = resolve_step_dir(Path(path).expanduser())
    meta = read_manifest(step_dir)
    if CONFIG_FILE in meta.get("checksums", {}):
        verify_files(step_dir, {"checksums": {CONFIG_FILE: meta["checksums"][CONFIG_FILE]}})
    return _read_config(step_dir)
