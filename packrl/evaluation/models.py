"""What an evaluation's ``models`` entries point at, checked at start-up, and their weights.

An entry is ``{name, path, base?}``. ``path`` is one of:

- an HF model directory (``config.json`` + ``model.safetensors`` or shards with an index);
- a checkpoint written by the GRPO recipe: a ``step_N`` dir, a run's ``checkpoints`` dir (its
  ``latest`` is used) or the run's ``output_dir``; an adapter-only LoRA checkpoint is an
  adapter on the run's source model;
- a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) on
  the base model ``base`` (default: the adapter config's ``base_model_name_or_path``).

Adapters are merged into the base weights in HF layout, W + (alpha / r) B A (DoRA: rescaled
to the saved magnitudes, row by row), so evaluation runs a plain model with any engine. Every
problem found by ``resolve_model`` (reading file headers only) is a ``ConfigError`` that names
the entry's field, so a bad entry stops the run before the first model is evaluated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from packrl.checkpointing.layout import (
    HF_INDEX_FILE,
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    resolve_step_dir,
)
from packrl.checkpointing.manifest import read_manifest, verify_files
from packrl.models.convert import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    hf_to_tune,
    read_hf_config,
    resolve_model_type,
)
from packrl.models.weights import load_base_weights
from packrl.training.config_schema import ConfigError

ENTRY_KEYS = ("name", "path", "base")
_PEFT_PREFIX = "base_model.model."


@dataclass
class ModelSource:
    """A resolved ``models`` entry.

    Attributes:
        name: the entry's name (rows of the table, lines of the plot, file names).
        field: ``models[i]``, for error messages.
        kind: "hf" (an HF directory), "checkpoint" (a GRPO checkpoint with full weights) or
            "adapter" (LoRA adapters on ``weights_dir``).
        weights_dir: the HF-layout directory holding the full (base) weights and config.json.
        adapter_dir: the PEFT adapter directory (kind "adapter" only).
        step: the training step of a GRPO checkpoint, else None.
        manifest: a GRPO checkpoint's manifest (its SHA-256s are checked when the weights
            are read), else None.
    """

    name: str
    field: str
    kind: str
    weights_dir: Path
    adapter_dir: Path | None = None
    step: int | None = None
    manifest: dict | None = None

    def describe(self) -> dict[str, Any]:
        """Plain values saying which weights these are (saved with the samples)."""
        return {
            "kind": self.kind,
            "weights_dir": str(self.weights_dir),
            "adapter_dir": None if self.adapter_dir is None else str(self.adapter_dir),
            "step": self.step,
        }


def _weight_files(d: Path) -> list[str]:
    """The safetensors files of an HF dir (shards via the index), [] when there are none."""
    index = d / HF_INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"] if (d / "model.safetensors").is_file() else []


def _check_hf_dir(d: Path, where: str) -> None:
    if not (d / "config.json").is_file():
        raise ConfigError(f"{where}={d} has no config.json: it is not an HF model directory")
    if not _weight_files(d):
        raise ConfigError(
            f"{where}={d} has no model.safetensors (or shards with {HF_INDEX_FILE}); "
            "packrl reads safetensors weights only"
        )
    try:
        resolve_model_type(None, read_hf_config(d))
    except ValueError as e:
        raise ConfigError(f"{where}={d}: {e}") from e


def resolve_model(entry: Mapping[str, Any], index: int) -> ModelSource:
    """Check one ``models`` entry and say what it points at (no weights are read).

    Raises:
        ConfigError: naming ``models[index].<key>``: a missing or unknown key, a path that
            does not exist or holds no model, an incomplete checkpoint, or an adapter that
            does not fit its base model (see ``check_adapter``).
    """
    field = f"models[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"'{field}' must be a mapping with name and path, got {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"'{field}' has unknown keys {unknown}; an entry takes {ENTRY_KEYS}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ConfigError(f"'{field}.name' must be a non-empty string without '/', got {name!r}")
    if not isinstance(entry.get("path"), str):
        raise ConfigError(f"'{field}.path' must be a directory path, got {entry.get('path')!r}")
    path = Path(entry["path"]).expanduser()
    base = entry.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"'{field}.base' must be a directory path, got {base!r}")
    if not path.is_dir():
        raise ConfigError(
            f"'{field}.path'={path} is not a directory; give an HF model dir, a GRPO "
            "checkpoint (step_N, checkpoints/ or the run's output_dir) or a PEFT adapter dir"
        )
    if (path / "checkpoints").is_dir() and not (path / META_FILE).is_file():
        path = path / "checkpoints"  # a run's output_dir
    source: ModelSource
    if (path / META_FILE).is_file() or (path / LATEST_FILE).is_file():
        try:
            step_dir = resolve_step_dir(path)
            meta = read_manifest(step_dir)
        except CheckpointError as e:
            raise ConfigError(f"'{field}.path': {e}") from e
        if meta.get("adapter_only"):
            base_dir = Path(base).expanduser() if base else Path(meta["source_checkpoint_dir"])
            source = ModelSource(
                name, field, "adapter", base_dir, step_dir, meta["step"], manifest=meta
            )
        else:
            if base is not None:
                raise ConfigError(
                    f"'{field}.base' is set, but '{field}.path'={path} holds a full model "
                    "(base applies to adapter-only checkpoints and PEFT adapters); remove base"
                )
            source = ModelSource(name, field, "checkpoint", step_dir, None, meta["step"], meta)
    elif (path / PEFT_CONFIG_FILE).is_file():
        config = _adapter_config(path, field)
        base_dir = Path(base or config.get("base_model_name_or_path") or "").expanduser()
        if not base and not base_dir.is_dir():
            raise ConfigError(
                f"'{field}.base' is needed: the adapter's {PEFT_CONFIG_FILE} names base model "
                f"{config.get('base_model_name_or_path')!r}, which is not a local directory; "
                "set base to the HF model directory the adapter was trained on"
            )
        source = ModelSource(name, field, "adapter", base_dir, path)
    else:
        source = ModelSource(name, field, "hf", path)
    where = f"'{field}.base'" if source.kind == "adapter" else f"'{field}.path'"
    if source.kind == "adapter" and not source.weights_dir.is_dir():
        raise ConfigError(f"{where}={source.weights_dir} is not a directory (the base model)")
    _check_hf_dir(source.weights_dir, where)
    if source.kind == "adapter":
        check_adapter(source)
    return source


def _adapter_config(adapter_dir: Path, field: str) -> dict:
    path = adapter_dir / PEFT_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{field}.path': {path} is not readable JSON: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(
            f"'{field}.path': {path} is a {config.get('peft_type')} adapter; only LoRA is read"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ConfigError(
                f"'{field}.path': {path} sets {key}; per-module ranks or alphas are not read"
            )
    if not isinstance(config.get("r"), int) or config["r"] < 1 or "lora_alpha" not in config:
        raise ConfigError(f"'{field}.path': {path} needs an integer r >= 1 and lora_alpha")
    if not (adapter_dir / PEFT_WEIGHTS_FILE).is_file():
        raise ConfigError(f"'{field}.path'={adapter_dir} has {PEFT_CONFIG_FILE} but no {PEFT_WEIGHTS_FILE}")  # fmt: skip
    return config


def _base_shapes(weights_dir: Path) -> dict[str, list[int]]:
    shapes = {}
    for name in _weight_files(weights_dir):
        with safe_open(weights_dir / name, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def _adapter_modules(keys: list[str]) -> dict[str, dict[str, str]]:
    """HF base weight key -> {"A", "B", "m"?: adapter key}, from PEFT adapter keys."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        plain = key.removeprefix(_PEFT_PREFIX)
        for part, tag in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                          (".lora_magnitude_vector.weight", "m"), (".lora_magnitude_vector", "m")):  # fmt: skip
            if plain.endswith(part):
                modules.setdefault(plain.removesuffix(part) + ".weight", {})[tag] = key
                break
        else:
            raise ValueError(f"adapter weight {key!r} is not a LoRA A/B matrix or DoRA magnitude")
    return modules


def check_adapter(source: ModelSource) -> None:
    """Check, from file headers, that the adapter fits its base model: every adapted weight
    exists in the base with shape [out, in], lora_A is [r, in], lora_B is [out, r], and r is
    the adapter config's.

    Raises:
        ConfigError: naming the entry's ``path`` and ``base`` and the first weight that does
            not fit.
    """
    assert source.adapter_dir is not None
    config = _adapter_config(source.adapter_dir, source.field)
    fix = (
        f"the adapter at '{source.field}.path'={source.adapter_dir} was not trained on the "
        f"base model {source.weights_dir}; set '{source.field}.base' to the model it was "
        f"trained on (its {PEFT_CONFIG_FILE} names {config.get('base_model_name_or_path')!r})"
    )
    base = _base_shapes(source.weights_dir)
    with safe_open(source.adapter_dir / PEFT_WEIGHTS_FILE, "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    try:
        modules = _adapter_modules(list(shapes))
    except ValueError as e:
        raise ConfigError(f"'{source.field}.path': {e}") from e
    if not modules:
        raise ConfigError(f"'{source.field}.path': {PEFT_WEIGHTS_FILE} holds no LoRA weights")
    r = config["r"]
    for weight, parts in sorted(modules.items()):
        if "A" not in parts or "B" not in parts:
            raise ConfigError(f"'{source.field}.path': {weight} has lora_A or lora_B missing")
        if weight not in base:
            raise ConfigError(f"{weight} is adapted but the base model has no such weight: {fix}")
        out, inp = base[weight]
        a, b = shapes[parts["A"]], shapes[parts["B"]]
        if a != [r, inp] or b != [out, r]:
            raise ConfigError(
                f"{weight}: lora_A {a} and lora_B {b} do not fit the base weight [{out}, {inp}] "
                f"with r={r}: {fix}"
            )
        if "m" in parts and shapes[parts["m"]] != [out]:
            raise ConfigError(f"{weight}: DoRA magnitude {shapes[parts['m']]} is not [{out}]: {fix}")  # fmt: skip


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for name in _weight_files(d):
        weights.update(load_file(d / name))
    return weights


def _verify(step_dir: Path, manifest: dict | None, names: list[str]) -> None:
    """SHA-256 of the files read from a GRPO checkpoint against its manifest."""
    checksums = (manifest or {}).get("checksums")
    if checksums is not None:
        verify_files(step_dir, {"checksums": {n: checksums[n] for n in names if n in checksums}})


def merge_adapter(
    weights: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], config: dict
) -> dict[str, torch.Tensor]:
    """HF base weights with a PEFT LoRA adapter merged in (a new dict; ``weights`` is kept).

    W' = W + s B A with s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); with DoRA
    magnitudes m, W' = m * V / ||V|| row by row, V = W + s B A (Liu et al. 2024, "DoRA",
    eq. 5, as PEFT and torchtune merge it). Shapes: A [r, in], B [out, r], W [out, in].
    """
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    merged = dict(weights)
    for key, parts in _adapter_modules(list(adapter)).items():
        w = weights[key]
        a, b = adapter[parts["A"]].to(torch.float32), adapter[parts["B"]].to(torch.float32)
        v = w.to(torch.float32) + scale * (b @ a)
        if "m" in parts:
            m = adapter[parts["m"]].to(torch.float32)
            v = v * (m / v.norm(p=2, dim=1)).unsqueeze(1)
        merged[key] = v.to(w.dtype)
    return merged


def load_weights(model: torch.nn.Module, source: ModelSource) -> torch.nn.Module:
    """Load the source's weights (adapters merged) into ``model``, a plain torchtune decoder
    built from the config's ``model`` component, verifying GRPO checkpoint checksums.

    Raises:
        ConfigError: the weights do not fit the model (naming the entry and ``model``).
        CheckpointError: a checkpoint file is missing or its SHA-256 differs.
    """
    files = _weight_files(source.weights_dir)
    if source.kind == "checkpoint":
        _verify(source.weights_dir, source.manifest, [*files, HF_INDEX_FILE])
    weights = _read_hf_weights(source.weights_dir)
    config = read_hf_config(source.weights_dir)
    if source.kind == "adapter":
        assert source.adapter_dir is not None
        if source.manifest is not None:
            _verify(source.adapter_dir, source.manifest, [PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE])
        adapter = load_file(source.adapter_dir / PEFT_WEIGHTS_FILE)
        adapter_config = _adapter_config(source.adapter_dir, source.field)
        weights = merge_adapter(weights, adapter, adapter_config)
    tune = hf_to_tune(weights, resolve_model_type(None, config), config)
    if "output.weight" in tune and "output.weight" not in model.state_dict():
        del tune["output.weight"]  # tied embeddings: HF files may still carry lm_head
    try:
        load_base_weights(model, tune, source=f"{source.field} ({source.weights_dir})")
    except RuntimeError as e:
        raise ConfigError(f"{e}; check that 'model._component_' builds this architecture") from e
    return model
