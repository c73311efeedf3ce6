"""Config validation for the GRPO recipe: every key is known, typed and bindable.

`validate_config(cfg)` runs at the top of `GRPORecipe.setup`, before anything heavy is built.
It checks every top-level and nested key against `GRPO_SCHEMA`:

- an unknown key is an error that names its dotted path and suggests the closest valid key;
- a value of the wrong type is an error that names the key, the expected type and the value;
- a `_component_` section is checked by importing the component and binding its arguments
  (plus the ones the recipe passes itself) to the component's signature with
  `inspect.signature(...).bind`. Nothing is instantiated, so no weights are loaded.

All errors are collected and raised together as one `ConfigError`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config key is unknown, ill-typed, or does not fit its component."""


@dataclass(frozen=True)
class Component:
    """A `_component_` section.

    Attributes:
        recipe_args: how many positional arguments the recipe passes (e.g. the optimizer's
            params).
        recipe_kwargs: keyword arguments the recipe passes itself; the config must not set them.
        recipe_defaults: keyword arguments the recipe fills in when the config leaves them out.
        required: whether the section must be present (optional sections may be null).
    """

    recipe_args: int = 0
    recipe_kwargs: tuple[str, ...] = ()
    recipe_defaults: tuple[str, ...] = ()
    required: bool = True


@dataclass(frozen=True)
class Value:
    """A plain value: `types` are the accepted Python types (after interpolation)."""

    types: tuple[type, ...]
    required: bool = False
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        names = [_TYPE_NAMES.get(t, t.__name__) for t in self.types]
        return " or ".join(names) + (f" (one of {list(self.choices)})" if self.choices else "")


_TYPE_NAMES = {type(None): "null", int: "int", float: "float", str: "str", bool: "bool"}
NUM = (int, float)
OPT = (type(None),)

# Schema: a key maps to a Value, a Component, or a nested dict schema (a plain section).
Schema = Mapping[str, Any]

GRPO_SCHEMA: Schema = {
    "output_dir": Value((str,), required=True),
    "model_dir": Value((str,)),
    "seed": Value((int,), required=True),
    "device": Value((str,), required=True),
    "dtype": Value((str,), required=True, choices=("fp32", "bf16")),
    "max_steps": Value((int,), required=True),
    "model": Component(),
    "tokenizer": Component(),
    "checkpointer": Component(),
    "resume_from_checkpoint": Value((bool,)),
    "save_every_n_steps": Value((int,) + OPT),
    "keep_last_checkpoints": Value((int,) + OPT),
    "task": Component(),
    "rewards": Component(recipe_defaults=("reward_funcs", "weights")),
    "sampler": Component(recipe_args=1, recipe_kwargs=("stop_token_ids", "pad_id")),
    "optimizer": Component(recipe_args=1),
    "lr_scheduler": Component(recipe_args=1, recipe_kwargs=("num_training_steps",), required=False),
    "metric_logger": Component(),
    "grpo": {
        "prompts_per_step": Value((int,), required=True),
        "group_size": Value((int,), required=True),
        "max_new_tokens": Value((int,), required=True),
        "temperature": Value(NUM),
        "top_p": Value(NUM),
        "top_k": Value((int,) + OPT),
        "scale_advantages_by_std": Value((bool,)),
        "drop_uniform_groups": Value((bool,)),
        "num_passes": Value((int,)),
        "epsilon_low": Value(NUM),
        "epsilon_high": Value(NUM),
        "beta": Value(NUM),
        "loss_type": Value((str,), choices=("grpo", "dapo", "dr_grpo")),
        "reference_on_cpu": Value((bool,)),
    },
    "packing": {
        "row_len": Value((int,), required=True),
        "tokens_per_micro_batch": Value((int,)),
        "truncate": Value((bool,)),
        "logprob_chunk_size": Value((int,)),
    },
    "clip_grad_norm": Value(NUM + OPT),
    "enable_activation_checkpointing": Value((bool,)),
    "enable_activation_offloading": Value((bool,)),
    "eval": {
        "every_n_steps": Value((int,) + OPT),
        "at_start": Value((bool,)),
        "num_rows": Value((int,) + OPT),
        "max_new_tokens": Value((int,) + OPT),
        "num_samples": Value((int,)),
        "temperature": Value(NUM),
    },
    "log_num_completions": Value((int,)),
    "plot": Value((bool,)),
}


def validate_config(cfg: DictConfig | Mapping[str, Any], schema: Schema = GRPO_SCHEMA) -> None:
    """Raise `ConfigError` listing every unknown, missing, ill-typed or unbindable key."""
    if isinstance(cfg, DictConfig):
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # a bad ${...} interpolation names its key in the message
            raise ConfigError(f"config: cannot resolve an interpolation: {e}") from e
    else:
        data = dict(cfg)
    errors: list[str] = []
    _check_section(data, schema, "", errors)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _check_section(data: Mapping[str, Any], schema: Schema, prefix: str, errors: list[str]) -> None:
    for key, value in data.items():
        path = prefix + str(key)
        if key not in schema:
            errors.append(f"unknown key '{path}'{_suggest(str(key), schema, prefix)}")
            continue
        _check_value(value, schema[key], path, errors)
    for key, spec in schema.items():
        if key not in data and _is_required(spec):
            errors.append(f"missing required key '{prefix + key}'")


def _is_required(spec: Any) -> bool:
    if isinstance(spec, (Value, Component)):
        return spec.required
    return any(_is_required(s) for s in spec.values())


def _check_value(value: Any, spec: Any, path: str, errors: list[str]) -> None:
    if isinstance(spec, Value):
        ok = isinstance(value, spec.types) and not (
            isinstance(value, bool) and bool not in spec.types  # bool is an int subclass
        )
        if not ok:
            errors.append(
                f"'{path}' must be {spec.describe()}, got {type(value).__name__} {value!r}"
            )
        elif spec.choices is not None and value not in spec.choices:
            errors.append(f"'{path}' must be one of {list(spec.choices)}, got {value!r}")
    elif isinstance(spec, Component):
        if value is None and not spec.required:
            return
        if not isinstance(value, Mapping) or "_component_" not in value:
            errors.append(
                f"'{path}' must be a section with a '_component_' dotted path, got {value!r}"
            )
            return
        _check_component(value, spec, path, errors)
    else:
        if not isinstance(value, Mapping):
            errors.append(f"'{path}' must be a section (a mapping), got {value!r}")
            return
        _check_section(value, spec, path + ".", errors)


def _check_component(section: Mapping[str, Any], spec: Component, path: str, errors: list[str]):
    from torchtune.config._utils import _get_component_from_path

    dotted = section["_component_"]
    kwargs = {k: v for k, v in section.items() if k != "_component_"}
    try:
        target = _get_component_from_path(dotted)
    except Exception as e:
        errors.append(f"'{path}._component_': cannot import '{dotted}': {e}")
        return
    for k in spec.recipe_kwargs:
        if k in kwargs:
            errors.append(f"'{path}.{k}' is set by the recipe; remove it from the config")
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to bind
        return
    args = [None] * spec.recipe_args
    recipe_kwargs = {k: None for k in spec.recipe_kwargs if k in sig.parameters}
    recipe_kwargs.update(
        {k: None for k in spec.recipe_defaults if k in sig.parameters and k not in kwargs}
    )
    try:
        sig.bind(*args, **{**kwargs, **recipe_kwargs})
    except TypeError as e:
        unknown = [k for k in kwargs if k not in sig.parameters]
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if unknown and not has_var_kw:
            for k in unknown:
                valid = {p: None for p in sig.parameters if p not in spec.recipe_kwargs}
                errors.append(
                    f"unknown key '{path}.{k}': {dotted} takes no argument '{k}'"
                    f"{_suggest(k, valid, path + '.')}"
                )
        else:
            errors.append(f"'{path}': arguments do not fit {dotted}{sig}: {e}")


def _suggest(key: str, options: Mapping[str, Any], prefix: str) -> str:
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys here: {sorted(str(o) for o in options)}"
