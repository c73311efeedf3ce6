"""The eval recipe's config schema: every key, its type, range and default (the one place
defaults live), checked by ``packrl.training.config_schema.validate_config`` like the GRPO
recipe's. The ``models`` entries are checked by ``packrl.evaluation.models.resolve_model``."""

from __future__ import annotations

from packrl.training.config_schema import NUM, OPT, Component, Schema, Value

EVAL_SCHEMA: Schema = {
    "output_dir": Value((str,), required=True),
    "model_dir": Value((str,) + OPT),  # for ${model_dir} interpolation only
    "seed": Value((int,), default=0, hint="prompt i samples with a seed derived from it"),
    "device": Value((str,), default="cpu"),
    "dtype": Value((str,), default="fp32", choices=("fp32", "bf16")),
    "models": Value((list,), required=True),
    "model": Component(),
    "tokenizer": Component(),
    "task": Component(),
    "split": Value((str,), default="eval", choices=("eval", "train")),
    "num_rows": Value((int,) + OPT, ge=1, hint="null evaluates every row of the split"),
    "rewards": Component(recipe_defaults=("reward_funcs", "weights")),
    "sampler": Component(
        recipe_args=1,
        recipe_kwargs=("stop_token_ids", "pad_id"),
        recipe_defaults=("checkpoint_dir",),
    ),
    "sampling": {
        "num_samples": Value((int,), default=1, ge=1, hint="k samples per problem"),
        "max_new_tokens": Value((int,), required=True, ge=1),
        "temperature": Value(NUM, default=0.0, ge=0, hint="0 is greedy"),
        "top_p": Value(NUM, default=1.0, gt=0, le=1),
        "top_k": Value((int,) + OPT, ge=1, hint="null turns top-k off"),
    },
    "pass_at_k": Value((list,) + OPT, hint="null: 1, 2, 4, ... up to sampling.num_samples"),
    "difficulty_key": Value(
        (str,) + OPT, default="auto", hint="a row column; auto: players, level or difficulty"
    ),
    "prompts_per_chunk": Value(
        (int,) + OPT, ge=1, hint="null: one sampler batch (max_batch_size / num_samples)"
    ),
    "resume": Value((bool,), default=True, hint="false replaces saved samples"),
    "plot": Value((bool,), default=True),
}
