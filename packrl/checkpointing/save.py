"""Checkpoints that other tools can load and that resume a run exactly.

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
      packrl_checkpoint.json       step, model type, parameter names/shapes/dtypes

``adapter_only=True`` (LoRA) skips the merged full model and the copied files: the adapter
config names the source checkpoint dir as ``base_model_name_or_path``.

Every save is atomic: files go into a hidden temp dir beside the target, are fsynced, and the
dir is renamed into place before ``latest`` is replaced (also by rename). A crash at any point
leaves ``latest`` pointing at the previous complete checkpoint; stale temp dirs are removed by
the next save. Only one process (rank 0) may save into an ``out_dir``.

Resuming: build the model and load the *source* weights as at the start of the run, build the
optimizer and scheduler, then call ``load_checkpoint``. For full fine-tuning it loads the saved
weights; under LoRA it loads the adapters on top of the (unchanged) base weights.
"""

import io
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune.models import convert_weights
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt

from packrl.training.distributed import barrier, gather_to_rank0, shard_like, world

FORMAT_VERSION = 1
META_FILE = "packrl_checkpoint.json"
STATE_FILE = "training_state.pt"
LATEST_FILE = "latest"
HF_INDEX_FILE = "model.safetensors.index.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-step_"

# Files of a source checkpoint dir that are weights or belong to another run, never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_COPIED = {
    HF_INDEX_FILE,
    "pytorch_model.bin.index.json",
    PEFT_CONFIG_FILE,
    META_FILE,
    LATEST_FILE,
    "packrl_source.json",  # provenance marker of packrl.models' GGUF conversion
}

# torchtune checkpointer model types whose HF <-> torchtune conversion is the generic llama one.
_GENERIC_TYPES = {"LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL"}
SUPPORTED_MODEL_TYPES = tuple(sorted(_GENERIC_TYPES | {"QWEN2"}))
# config.json "model_type" -> torchtune model type, used when the caller gives none.
_HF_MODEL_TYPES = {"llama": "LLAMA3_2", "mistral": "MISTRAL", "qwen2": "QWEN2"}

# torchtune module names -> PEFT target module names (as torchtune's converter maps them).
_PEFT_TARGETS = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model."""


# ----------------------------------------------------------------------------- conversion


def read_hf_config(source_checkpoint_dir: Path) -> dict:
    """The HF ``config.json`` of a model directory, with an error that says what to pass."""
    path = source_checkpoint_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"source_checkpoint_dir={source_checkpoint_dir} has no config.json; pass the HF "
            "model directory the run started from (the checkpointer's checkpoint_dir)"
        )
    return json.loads(path.read_text())


def resolve_model_type(model_type: str | None, config: dict) -> str:
    """torchtune's model type (LLAMA3_2, QWEN2, ...): given, or inferred from config.json."""
    if model_type is None:
        hf_type = config.get("model_type")
        if hf_type not in _HF_MODEL_TYPES:
            raise ValueError(
                f"cannot infer model_type from config.json model_type={hf_type!r}; pass "
                f"model_type= one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        return _HF_MODEL_TYPES[hf_type]
    model_type = model_type.upper()
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported for HF checkpoints; use one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _head_args(config: dict) -> dict:
    return dict(
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
    )


def tune_to_hf(state_dict: dict, model_type: str, config: dict) -> dict:
    """torchtune keys -> HF keys, exactly as FullModelHFCheckpointer.save_checkpoint does."""
    if model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        return qwen2_tune_to_hf(
            state_dict,
            **_head_args(config),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )
    return convert_weights.tune_to_hf(
        state_dict, **_head_args(config), head_dim=config.get("head_dim")
    )


def hf_to_tune(state_dict: dict, model_type: str, config: dict) -> dict:
    """HF keys -> torchtune keys, exactly as FullModelHFCheckpointer.load_checkpoint does."""
    if model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(
            state_dict,
            **_head_args(config),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )
    return convert_weights.hf_to_tune(
        state_dict, **_head_args(config), head_dim=config.get("head_dim")
    )


def _rope_rows_to_hf(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Output rows of a q/k projection ([out, ...], out = n_heads * head_dim) from torchtune's
    RoPE layout (per head, interleaved pairs) to HF's (per head, two halves), the permutation
    ``convert_weights.tune_to_hf`` applies to the q/k weights."""
    return t.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(t.shape)


def tune_to_peft(adapter: dict[str, torch.Tensor], model_type: str, config: dict) -> dict:
    """LoRA/DoRA adapter weights, torchtune keys -> PEFT keys, with rows in the layout of the
    HF base weights that ``tune_to_hf`` writes for ``model_type``, so PEFT and vLLM apply them
    to the right outputs.

    torchtune's ``tune_to_peft_adapter_weights`` gives the names, but its layout is right only
    for LoRA on Llama-layout models: it permutes q/k ``lora_B`` rows even for Qwen2, whose
    converter permutes nothing, and it never permutes DoRA magnitudes (one per output row).
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    names = convert_weights.tune_to_peft_adapter_weights(
        adapter, **_head_args(config), head_dim=config.get("head_dim")
    )
    peft = {}
    for (key, value), name in zip(adapter.items(), names, strict=True):
        # layers.0.attn.q_proj.lora_b.weight or layers.0.attn.q_proj.magnitude
        module = key.removesuffix(".weight").split(".")[-2]
        per_output_row = key.endswith(("lora_b.weight", "magnitude"))
        if model_type in _GENERIC_TYPES and module in heads and per_output_row:
            value = _rope_rows_to_hf(value, heads[module], head_dim)
        peft[name] = value
    return peft


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """LoRA/DoRA modules by name (activation-checkpoint wrapper prefixes removed)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_a") and hasattr(module, "lora_b"):
            out[name.replace("_checkpoint_wrapped_module.", "")] = module
    return out


def _lora_hparams(model: nn.Module) -> dict:
    """rank, alpha, dropout, use_dora and target modules, read off the model's LoRA modules."""
    modules = _lora_modules(model)
    ranks = {m.lora_a.out_features for m in modules.values()}
    alphas = {
        float(m.alpha) if hasattr(m, "alpha") else m.scaling * m.lora_a.out_features
        for m in modules.values()
    }
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(
            f"LoRA modules have mixed ranks {sorted(ranks)} or alphas {sorted(alphas)}; the PEFT "
            "format and the merged checkpoint need one rank and one alpha"
        )
    dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in modules.values()}
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    unknown = [t for t in targets if t not in _PEFT_TARGETS]
    if unknown:
        raise ValueError(
            f"LoRA on modules {unknown} has no PEFT name; known: {list(_PEFT_TARGETS)}"
        )
    return dict(
        rank=ranks.pop(),
        alpha=alphas.pop(),
        dropout=max(dropouts),
        use_dora=any(hasattr(m, "magnitude") for m in modules.values()),
        targets=targets,
    )


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict:
    """PEFT ``adapter_config.json`` contents for the LoRA adapters of ``model``."""
    hp = _lora_hparams(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": hp["rank"],
        "lora_alpha": hp["alpha"],
        "lora_dropout": hp["dropout"],
        "target_modules": [_PEFT_TARGETS[t] for t in hp["targets"]],
        "use_dora": hp["use_dora"],
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


# ----------------------------------------------------------------------------- file helpers


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (directories: so that renames in them persist)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


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
        _write_json(
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


def _describe_params(state_dict: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in state_dict.items()
    }


# ----------------------------------------------------------------------------- RNG


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    saved = state["generators"]
    if set(saved) != set(generators):
        raise CheckpointError(
            f"the checkpoint has generator states for {sorted(saved)} but generators= "
            f"{sorted(generators)} was passed; pass the same names as at save time"
        )
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    for k, g in generators.items():
        g.set_state(saved[k])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save


def _step_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out_dir.iterdir() if out_dir.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _write_checkpoint_files(
    tmp: Path,
    step: int,
    *,
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: Path,
    adapter_only: bool,
    model_type: str,
    config: dict,
    max_shard_bytes: int,
) -> tuple[dict, dict]:
    """Model files into ``tmp`` from the model's whole CPU ``state_dict``; returns (metadata,
    LoRA adapter state in torchtune keys)."""
    adapter = get_adapter_state_dict(state_dict)
    if adapter_only and not adapter:
        raise ValueError("adapter_only=True but the model has no LoRA adapters")

    files: list[str] = []
    if not adapter_only:
        full = state_dict
        if adapter:
            hp = _lora_hparams(model)
            # get_merged_lora_ckpt adds into the adapted base weights in place: copy those.
            adapted = {k.replace(".lora_a.weight", ".weight") for k in adapter if ".lora_a." in k}
            full = {k: v.clone() if k in adapted else v for k, v in state_dict.items()}
            full = get_merged_lora_ckpt(full, rank=hp["rank"], alpha=hp["alpha"])
        hf = tune_to_hf(full, model_type, config)
        hf = {k: v.contiguous() for k, v in hf.items()}
        files += _save_safetensors_shards(hf, tmp, max_shard_bytes)
        files += _copy_source_files(source, tmp)
    if adapter:
        peft = tune_to_peft(adapter, model_type, config)
        save_file({k: v.contiguous() for k, v in peft.items()}, tmp / PEFT_WEIGHTS_FILE)
        _write_json(tmp / PEFT_CONFIG_FILE, peft_adapter_config(model, str(source.resolve())))
        files += [PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE]

    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "model_type": model_type,
        "lora": bool(adapter),
        "adapter_only": adapter_only,
        "source_checkpoint_dir": str(source.resolve()),
        "files": files,
        "params": _describe_params(state_dict),
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
) -> Path:
    """Atomically write ``out_dir/step_{step}/`` and point ``out_dir/latest`` at it.

    ``model_type`` is torchtune's checkpointer model type (``LLAMA3_2``, ``QWEN2``, ...);
    by default it is inferred from the source config.json. ``data_state`` is any dict of
    plain values/tensors (the data position); ``generators`` are torch.Generators whose
    states are restored by name. ``keep_last`` keeps only the newest N step dirs.
    Returns the step directory.

    Under torchrun (FSDP2) every rank calls it: the shards are gathered to rank 0, which
    alone writes one consolidated checkpoint; the others wait until it is complete.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    _check_loadable("data_state", data_state)
    for name, g in (generators or {}).items():
        if not isinstance(g, torch.Generator):
            raise TypeError(
                f"generators[{name!r}] must be a torch.Generator, got {type(g).__name__}"
            )
    out_dir = Path(out_dir).expanduser()
    source = Path(source_checkpoint_dir).expanduser()
    config = read_hf_config(source)
    model_type = resolve_model_type(model_type, config)
    if source.resolve() == out_dir.resolve():
        raise ValueError("out_dir must not be the source checkpoint dir")
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
            config=config,
            max_shard_bytes=max_shard_bytes,
            training_state={
                "step": step,
                "optimizer": optimizer_state,
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                "rng": _rng_state(generators or {}),
                "data_state": data_state if data_state is not None else {},
            },
        )
    finally:
        barrier()
    if keep_last is not None:
        for _, old_dir in _step_dirs(out_dir)[:-keep_last]:
            if old_dir != target:
                shutil.rmtree(old_dir)
    return target


def _save_on_rank0(
    out_dir: Path,
    target: Path,
    step: int,
    *,
    training_state: dict,
    **file_args: Any,
) -> None:
    """Write ``target`` atomically (a temp dir renamed into place), then point ``latest``
    at it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(_TMP_PREFIX + "*"):  # left by a crashed save
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=out_dir))
    try:
        meta, adapter = _write_checkpoint_files(tmp, step, **file_args)
        _save_training_state(tmp / STATE_FILE, {**training_state, "adapter": adapter})
        # The metadata file goes last: a directory with it is complete.
        _write_json(tmp / META_FILE, meta)
        for f in tmp.iterdir():
            f.chmod(0o644)
            _fsync(f)
        tmp.chmod(0o755)  # mkdtemp makes it private; checkpoints are read by other tools
        _fsync(tmp)

        if target.exists():  # saving a step again (e.g. after a resume): replace it
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{step}-", dir=out_dir))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        latest_tmp = out_dir / f"{_TMP_PREFIX}latest"
        latest_tmp.write_text(target.name + "\n")
        _fsync(latest_tmp)
        os.replace(latest_tmp, out_dir / LATEST_FILE)
        _fsync(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in out_dir.glob(_TMP_PREFIX + "old-*"):
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- load


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


def _resolve_step_dir(path: Path) -> Path:
    if (path / META_FILE).is_file():
        return path
    step_dir = latest_checkpoint(path)
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a step_N dir with {META_FILE}, or an output "
            f"dir with a {LATEST_FILE!r} file"
        )
    return step_dir


def _first(items: Iterable[str], n: int = 5) -> list[str]:
    return sorted(items)[:n]


def _check_params(meta: dict, model_sd: dict[str, torch.Tensor], step_dir: Path) -> None:
    saved = meta["params"]
    current = _describe_params(model_sd)
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
        hf.update(load_file(step_dir / name))
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
    save time). Returns ``{"step", "data_state", "path"}``.
    """
    step_dir = _resolve_step_dir(Path(path).expanduser())
    try:
        meta = json.loads((step_dir / META_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{step_dir / META_FILE} is corrupt: {e}") from e
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
    _set_rng_state(state["rng"], generators or {})
    return {"step": state["step"], "data_state": state["data_state"], "path": step_dir}
