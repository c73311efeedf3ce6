"""Write a checkpoint that other tools can load and that resumes a run exactly.

``save_checkpoint`` writes ``out_dir/step_{step}/`` and then points ``out_dir/latest`` at it:

    step_12/
      model.safetensors            full model (LoRA merged in), HF key names; or
      model-0000i-of-0000n.safetensors + model.safetensors.index.json for big models
      config.json tokenizer* ...   copied from the source checkpoint dir, so the directory
                                   loads in torchtune (FullModelHFCheckpointer), transformers, vLLM
      adapter_model.safetensors    LoRA only: PEFT format (also loadable as a vLLM LoRARequest)
      adapter_config.json
      training_state.pt            exact resume: optimizer, LR scheduler, RNG states, caller's
                                   generators, data position, step, LoRA adapters (torchtune keys)
      run_config.yaml              the run's resolved config, when the caller passes one
      packrl_checkpoint.json       step, model type, parameter names/shapes/dtypes, and the
                                   size and SHA-256 of every other file (written last)

``adapter_only=True`` (LoRA) skips the merged full model and the copied files: the adapter
config names the source checkpoint dir as ``base_model_name_or_path``.

Every save is atomic (``packrl.atomic_dir``): files go into a hidden temp dir beside the
target, are fsynced, and the dir is renamed into place before ``latest`` is replaced (also by
rename). A crash or a full disk at any point leaves ``latest`` pointing at the previous
complete checkpoint; stale temp dirs are removed by the next save. Only one process (rank 0)
may save into an ``out_dir`` (``claim_output_dir`` keeps other runs out).
"""

import errno
import io
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt

from packrl.atomic_dir import publish_dir, remove_staged, staged_dir, write_file_atomically
from packrl.checkpointing.layout import (
    CONFIG_FILE,
    FORMAT_VERSION,
    HF_INDEX_FILE,
    LATEST_FILE,
    META_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    step_dirs,
)
from packrl.checkpointing.manifest import describe_params, file_checksums, write_json
from packrl.checkpointing.rng import rng_state
from packrl.models.convert import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    lora_hparams,
    peft_adapter_config,
    read_hf_config,
    resolve_model_type,
    tune_to_hf,
    tune_to_peft,
)
from packrl.training.distributed import barrier, gather_to_rank0, world

# Files of a source checkpoint dir that are weights or belong to another run, never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_COPIED = {
    HF_INDEX_FILE,
    "pytorch_model.bin.index.json",
    PEFT_CONFIG_FILE,
    META_FILE,
    LATEST_FILE,
    CONFIG_FILE,
    "packrl_source.json",  # provenance marker of packrl.models' GGUF conversion
}
_MB = 1e6


def _save_safetensors_shards(state_dict: dict, out: Path, max_shard_bytes: int) -> list[str]:
    """HF-style weights: one model.safetensors, or shards plus an index when too big."""
    shards: list[dict] = [{}]
    size = 0
    for key, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        n = len(shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
        write_json(
            out / HF_INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, out / name, metadata={"format": "pt"})
    return names


def _copy_source_files(source: Path, out: Path) -> list[str]:
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name not in _NOT_COPIED:
            shutil.copyfile(f, out / f.name)
            copied.append(f.name)
    return copied


def _write_checkpoint_files(
    tmp: Path,
    step: int,
    *,
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: Path,
    adapter_only: bool,
    model_type: str,
    hf_config: dict,
    max_shard_bytes: int,
) -> tuple[dict, dict]:
    """Model files into ``tmp`` from the model's whole CPU ``state_dict``; returns (metadata,
    LoRA adapter state in torchtune keys)."""
    adapter = get_adapter_state_dict(state_dict)
    files: list[str] = []
    if not adapter_only:
        full = state_dict
        if adapter:
            hp = lora_hparams(model)
            # get_merged_lora_ckpt adds into the adapted base weights in place: copy those.
            adapted = {k.replace(".lora_a.weight", ".weight") for k in adapter if ".lora_a." in k}
            full = {k: v.clone() if k in adapted else v for k, v in state_dict.items()}
            full = get_merged_lora_ckpt(full, rank=hp["rank"], alpha=hp["alpha"])
        hf = tune_to_hf(full, model_type, hf_config)
        hf = {k: v.contiguous() for k, v in hf.items()}
        files += _save_safetensors_shards(hf, tmp, max_shard_bytes)
        files += _copy_source_files(source, tmp)
    if adapter:
        peft = tune_to_peft(adapter, model_type, hf_config)
        save_file({k: v.contiguous() for k, v in peft.items()}, tmp / PEFT_WEIGHTS_FILE)
        write_json(tmp / PEFT_CONFIG_FILE, peft_adapter_config(model, str(source.resolve())))
        files += [PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE]

    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "model_type": model_type,
        "lora": bool(adapter),
        "adapter_only": adapter_only,
        "source_checkpoint_dir": str(source.resolve()),
        "files": files,
        "params": describe_params(state_dict),
    }
    return meta, adapter


def _check_loadable(name: str, value: Any) -> None:
    """Fail at save time, not at resume, if ``value`` will not load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise TypeError(
            f"{name} must hold only plain Python values (dict, list, str, int, float, bool, "
            f"None) and tensors, so that it loads safely: {e}"
        ) from e


def _config_yaml(config: dict | None) -> str | None:
    """The run's config as YAML, checked before anything is gathered or written."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise TypeError(
            f"config must be a plain dict (e.g. OmegaConf.to_container(cfg, resolve=True)), "
            f"got {type(config).__name__}"
        )
    try:
        return yaml.safe_dump(config, sort_keys=False)
    except yaml.YAMLError as e:
        raise TypeError(
            f"config must hold only plain values (dict, list, str, int, float, bool, None): {e}"
        ) from e


def _save_training_state(path: Path, state: dict) -> None:
    torch.save(state, path)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    source_checkpoint_dir: str | Path,
    adapter_only: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    data_state: dict | None = None,
    generators: dict[str, torch.Generator] | None = None,
    model_type: str | None = None,
    keep_last: int | None = None,
    max_shard_bytes: int = 5 * 2**30,
    config: dict | None = None,
) -> Path:
    """Atomically write ``out_dir/step_{step}/`` and point ``out_dir/latest`` at it.

    ``model_type`` is torchtune's checkpointer model type (``LLAMA3_2``, ``QWEN2``, ...);
    by default it is inferred from the source config.json. ``data_state`` is any dict of
    plain values/tensors (the data position); ``generators`` are torch.Generators whose
    states are restored by name. ``keep_last`` keeps only the newest N step dirs.
    ``config`` is the run's resolved config (plain values), saved as ``run_config.yaml`` so
    that a resume can say what changed (``config_changes``). Returns the step directory.

    Raises CheckpointError when the disk cannot hold the checkpoint (naming the path and the
    space needed; ``latest`` is left where it was), ValueError/TypeError for bad arguments.

    Under torchrun (FSDP2) every rank calls it: the shards are gathered to rank 0, which
    alone writes one consolidated checkpoint; the others wait until it is complete.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    _check_loadable("data_state", data_state)
    config_yaml = _config_yaml(config)
    for name, g in (generators or {}).items():
        if not isinstance(g, torch.Generator):
            raise TypeError(
                f"generators[{name!r}] must be a torch.Generator, got {type(g).__name__}"
            )
    out_dir = Path(out_dir).expanduser()
    source = Path(source_checkpoint_dir).expanduser()
    hf_config = read_hf_config(source)
    model_type = resolve_model_type(model_type, hf_config)
    if source.resolve() == out_dir.resolve():
        raise ValueError("out_dir must not be the source checkpoint dir")
    if adapter_only and not get_adapter_state_dict(model.state_dict()):
        raise ValueError("adapter_only=True but the model has no LoRA adapters")
    target = out_dir / f"step_{step}"
    # Collectives first, on every rank: whole tensors end up on rank 0 only.
    state_dict = gather_to_rank0(model.state_dict())
    optimizer_state = gather_to_rank0(optimizer.state_dict()) if optimizer is not None else None
    if world()[1] != 0:
        barrier()  # until rank 0 has written the checkpoint
        return target
    try:
        _save_on_rank0(
            out_dir,
            target,
            step,
            model=model,
            state_dict=state_dict,
            source=source,
            adapter_only=adapter_only,
            model_type=model_type,
            hf_config=hf_config,
            max_shard_bytes=max_shard_bytes,
            config_yaml=config_yaml,
            training_state={
                "step": step,
                "optimizer": optimizer_state,
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                "rng": rng_state(generators or {}),
                "data_state": data_state if data_state is not None else {},
            },
        )
    finally:
        barrier()
    if keep_last is not None:
        for _, old_dir in step_dirs(out_dir)[:-keep_last]:
            if old_dir != target:
                shutil.rmtree(old_dir)
    return target


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nest of dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _bytes_needed(state_dict: dict, training_state: dict, source: Path, adapter_only: bool) -> int:
    """A lower bound of the checkpoint's size: the tensors it writes (merged weights, PEFT
    adapters, the training state with its own adapter copy) and the copied source files."""
    adapter = get_adapter_state_dict(state_dict)
    size = 2 * _tensor_bytes(adapter) + _tensor_bytes(training_state)
    if not adapter_only:
        base = {k: v for k, v in state_dict.items() if k not in adapter}
        size += _tensor_bytes(base) + sum(
            f.stat().st_size
            for f in source.iterdir()
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name not in _NOT_COPIED
        )
    return size


def _full_disk_error(
    target: Path, needed: int, free: int, when: str, cause: BaseException | None = None
) -> CheckpointError:
    try:
        latest = latest_checkpoint(target.parent)
        where = f"still points at {latest.name}" if latest else "was not written (no checkpoint)"
    except CheckpointError as e:
        where = f"is unchanged ({e})"
    return CheckpointError(
        f"cannot save checkpoint {target}: not enough space on its disk {when} "
        f"(the checkpoint needs about {needed / _MB:,.2f} MB, {free / _MB:,.2f} MB is free"
        f"{f'; {type(cause).__name__}: {cause}' if cause else ''}). "
        f"{target.parent / LATEST_FILE} {where}. Free space on that disk, keep fewer "
        "checkpoints (keep_last_checkpoints), or set output_dir on a larger disk."
    )


def _save_on_rank0(
    out_dir: Path,
    target: Path,
    step: int,
    *,
    training_state: dict,
    config_yaml: str | None,
    **file_args: Any,
) -> None:
    """Write ``target`` atomically (a temp dir renamed into place), then point ``latest``
    at it. Fails before writing when the disk is too small for the checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_staged(out_dir)  # left by a crashed save
    needed = _bytes_needed(
        file_args["state_dict"], training_state, file_args["source"], file_args["adapter_only"]
    )
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise _full_disk_error(target, needed, free, when="(checked before writing)")
    with staged_dir(target) as tmp:
        try:
            meta, adapter = _write_checkpoint_files(tmp, step, **file_args)
            _save_training_state(tmp / STATE_FILE, {**training_state, "adapter": adapter})
            if config_yaml is not None:
                (tmp / CONFIG_FILE).write_text(config_yaml)
            # The manifest goes last: a directory with it is complete.
            write_json(tmp / META_FILE, {**meta, "checksums": file_checksums(tmp)})
            publish_dir(tmp, target)
            write_file_atomically(out_dir / LATEST_FILE, target.name + "\n")
        except Exception as e:
            # torch.save and safetensors report a full disk as RuntimeError/SafetensorError
            # without an errno, so judge by the space left against what is still to write.
            written = sum(f.stat().st_size for f in tmp.iterdir()) if tmp.is_dir() else 0
            free = shutil.disk_usage(out_dir).free
            full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            if full or free < needed - written:
                raise _full_disk_error(target, needed, free, "while writing it", cause=e) from e
            raise
