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
import types
import typing
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
    default: Mapping[str, Any] | None = None  # the section used when the config has none


@dataclass(frozen=True)
class Value:
    """A plain value: `types` are the accepted Python types (after interpolation).

    `default` fills a missing optional key (the one place defaults live); `ge`, `gt`, `le`
    and `lt` bound a number; `hint` says how to fix a bad value.
    """

    types: tuple[type, ...]
    required: bool = False
    choices: tuple[Any, ...] | None = None
    default: Any = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    hint: str = ""

    def describe(self) -> str:
        names = [_TYPE_NAMES.get(t, t.__name__) for t in self.types]
        return " or ".join(names) + (f" (one of {list(self.choices)})" if self.choices else "")

    def range_error(self, value: Any) -> str | None:
        """What is wrong with a well-typed number's range, or None."""
        if not isinstance(value, NUM) or isinstance(value, bool):
            return None
        bounds = [
            (self.ge, ">=", lambda b: value >= b),
            (self.gt, ">", lambda b: value > b),
            (self.le, "<=", lambda b: value <= b),
            (self.lt, "<", lambda b: value < b),
        ]
        failed = [f"{op} {b:g}" for b, op, ok in bounds if b is not None and not ok(b)]
        if not failed:
            return None
        allowed = " and ".join(f"{op} {b:g}" for b, op, _ in bounds if b is not None)
        return f"must be {allowed}, got {value!r}" + (f" ({self.hint})" if self.hint else "")


_TYPE_NAMES = {
    type(None): "null", int: "int", float: "float", str: "str", bool: "bool", list: "list"
}  # fmt: skip
NUM = (int, float)
OPT = (type(None),)

# Schema: a key maps to a Value, a Component, or a nested dict schema (a plain section).
Schema = Mapping[str, Any]

GRPO_SCHEMA: Schema = {
    "output_dir": Value((str,), required=True),
    "model_dir": Value((str,) + OPT),
    "seed": Value((int,) + OPT, required=True),
    "device": Value((str,), required=True),
    "dtype": Value((str,), required=True, choices=("fp32", "bf16")),
    "mixed_precision": Value(
        (str,) + OPT,
        choices=(None, "bf16"),
        hint="bf16: fp32 weights and optimizer, bf16 matmuls in training (torch.autocast)",
    ),
    "max_steps": Value((int,), required=True, ge=1),
    "model": Component(),
    "tokenizer": Component(),
    "checkpointer": Component(),
    "resume_from_checkpoint": Value((bool,), default=False),
    "overwrite": Value((bool,), default=False, hint="true moves an old run in output_dir aside"),
    "resume_allow_changed": Value((list,), default=[]),
    "save_every_n_steps": Value((int,) + OPT, ge=1, hint="null saves only at the end"),
    "keep_last_checkpoints": Value((int,) + OPT, ge=1, hint="null keeps every checkpoint"),
    "task": Component(),
    "rewards": Component(recipe_defaults=("reward_funcs", "weights")),
    "sampler": Component(recipe_args=1, recipe_kwargs=("stop_token_ids", "pad_id")),
    "loss": Component(required=False, default={"_component_": "packrl.rl.loss.GRPOLoss"}),
    "optimizer": Component(recipe_args=1),
    "lr_scheduler": Component(recipe_args=1, recipe_kwargs=("num_training_steps",), required=False),
    "metric_logger": Component(),
    "grpo": {
        "prompts_per_step": Value((int,), required=True, ge=1),
        "group_size": Value(
            (int,), required=True, ge=2, hint="advantages are relative to the group's other samples"
        ),
        "max_new_tokens": Value((int,), required=True, ge=1),
        "temperature": Value(
            NUM, default=1.0, gt=0, hint="training samples; greedy decoding has no exploration"
        ),
        "top_p": Value(NUM, default=1.0, gt=0, le=1),
        "top_k": Value((int,) + OPT, ge=1, hint="null turns top-k off"),
        "scale_rewards": Value((str,), default="group", choices=("group", "batch", "none")),
        "drop_uniform_groups": Value((bool,), default=False),
        "dynamic_sampling": Value((bool,), default=False),
        "max_sampling_rounds": Value((int,), default=3, ge=1),
        "num_passes": Value((int,), default=1, ge=1),
        "reference_on_cpu": Value((bool,), default=False),
    },
    "packing": {
        "row_len": Value((int,), required=True, ge=2),
        "tokens_per_micro_batch": Value((int,) + OPT, ge=1, hint="null: one row per micro-batch"),
        "truncate": Value((bool,), default=False),
        "long_prompts": Value((str,), default="error", choices=("error", "skip")),
        "logprob_chunk_size": Value((int,), default=1024, ge=1),
    },
    "clip_grad_norm": Value(NUM + OPT, gt=0, hint="null turns clipping off"),
    "enable_activation_checkpointing": Value(
        (bool, str), default=False, choices=(True, False, "auto")
    ),
    "activation_memory_budget_gb": Value(
        NUM + OPT, gt=0, hint="null: free device memory (CUDA) or half the available RAM (CPU)"
    ),
    "enable_activation_offloading": Value(
        (bool, str), default=False, choices=(True, False, "auto")
    ),
    "eval": {
        "every_n_steps": Value((int,) + OPT, ge=1, hint="null evaluates only at the start/end"),
        "at_start": Value((bool,), default=False),
        "num_rows": Value((int,) + OPT, ge=1, hint="null evaluates every held-out row"),
        "max_new_tokens": Value((int,) + OPT, ge=1, hint="null uses grpo.max_new_tokens"),
        "num_samples": Value((int,), default=1, ge=1),
        "temperature": Value(NUM, default=0.0, ge=0, hint="0 is greedy"),
    },
    "preemption_signals": Value((list,), default=["SIGTERM", "SIGUSR1"]),
    "log_num_completions": Value((int,), default=4, ge=0),
    "plot": Value((bool,), default=True),
}


def _relations(cfg: Mapping[str, Any]) -> list[str]:
    """Checks that tie keys together (each key alone is already in range)."""
    errors = []
    grpo, packing = cfg.get("grpo", {}), cfg.get("packing", {})
    new, row_len = grpo.get("max_new_tokens"), packing.get("row_len")
    if isinstance(new, int) and isinstance(row_len, int) and new >= row_len:
        errors.append(
            f"'grpo.max_new_tokens' ({new}) must be below 'packing.row_len' ({row_len}): a row "
            "holds a prompt and its completions; raise packing.row_len or lower max_new_tokens"
        )
    if cfg.get("mixed_precision") is not None and cfg.get("dtype") != "fp32":
        errors.append(
            f"'mixed_precision: {cfg['mixed_precision']}' computes in bf16 over fp32 weights, "
            f"so it needs 'dtype: fp32' (got {cfg.get('dtype')!r}); with dtype: bf16 everything "
            "is bf16 already: set mixed_precision: null"
        )
    return errors


def validate_config(cfg: DictConfig | Mapping[str, Any], schema: Schema = GRPO_SCHEMA) -> None:
    """Raise `ConfigError` listing every unknown, missing, ill-typed, out-of-range or
    unbindable key, and every broken relation between keys."""
    if isinstance(cfg, DictConfig):
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # a bad ${...} interpolation names its key in the message
            raise ConfigError(f"config: cannot resolve an interpolation: {e}") from e
    else:
        data = dict(cfg)
    errors: list[str] = []
    _check_section(data, schema, "", errors)
    if schema is GRPO_SCHEMA and not errors:
        errors += _relations(data)
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
        elif (problem := spec.range_error(value)) is not None:
            errors.append(f"'{path}' {problem}")
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
    for k, v in kwargs.items():
        param = sig.parameters.get(k)
        types = _simple_types(target, param) if param is not None else None
        if types is not None and not _is_instance(v, types):
            names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            errors.append(f"'{path}.{k}' must be {names}, got {type(v).__name__} {v!r}")
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


def _simple_types(target: Any, param: inspect.Parameter) -> tuple[type, ...] | None:
    """The accepted types of a parameter annotated with int, float, str, bool or an optional
    of one of them (float also accepts int); None for anything else (not checked)."""
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: leave the check to the component
        return None
    hint = hints.get(param.name)
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if not args or not all(a in _SIMPLE for a in args):
        return None
    return tuple(t for a in args for t in _SIMPLE[a])


_SIMPLE = {int: (int,), float: (int, float), str: (str,), bool: (bool,), type(None): (type(None),)}


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _suggest(key: str, options: Mapping[str, Any], prefix: str) -> str:
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys here: {sorted(str(o) for o in options)}"


def with_defaults(cfg: DictConfig, schema: Schema = GRPO_SCHEMA) -> DictConfig:
    """A copy of a validated `cfg` with every missing key that has a default filled in, so
    the recipe reads each key plainly, and the defaults live only in the schema."""
    out = cfg.copy()
    _fill_defaults(out, schema)
    return out


def _fill_defaults(section: DictConfig, schema: Schema) -> None:
    for key, spec in schema.items():
        if isinstance(spec, Value):
            if key not in section:
                OmegaConf.update(section, key, spec.default, force_add=True)
        elif isinstance(spec, Component):
            if section.get(key) is None and spec.default is not None:
                OmegaConf.update(section, key, dict(spec.default), force_add=True)
            elif key not in section:
                OmegaConf.update(section, key, None, force_add=True)
        else:
            if section.get(key) is None:
                OmegaConf.update(section, key, {}, force_add=True)
            _fill_defaults(section[key], spec)
