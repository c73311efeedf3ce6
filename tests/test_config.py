"""Config validation: every shipped config is valid; bad keys are named errors."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from packrl.training.config_schema import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in (ROOT / "tune_configs").glob("*.yaml") if not p.name.startswith("eval_")
)
EVAL_CONFIGS = sorted((ROOT / "tune_configs").glob("eval_*.yaml"))


def _cpu_config():
    return OmegaConf.load(ROOT / "tune_configs" / "smollm2_135m_arithmetic_full_cpu.yaml")


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "smollm2_135m_arithmetic_full_cpu.yaml" in names
    assert "smollm2_135m_arithmetic_lora_cpu.yaml" in names
    for size in ("0_5b", "1_5b", "3b", "7b"):
        for kind in ("full", "lora"):
            assert f"qwen2_5_{size}_temporal_clue_{kind}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    """Every key known and typed, every component importable with bindable arguments."""
    validate_config(OmegaConf.load(path))


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_shipped_eval_config_is_valid(path):
    from packrl.evaluation.config import EVAL_SCHEMA

    validate_config(OmegaConf.load(path), EVAL_SCHEMA)


def test_env_interpolation_and_cli_override(monkeypatch):
    """Paths come from ${oc.env:...} with defaults, and survive torchtune's CLI merge."""
    from argparse import Namespace

    from torchtune.config._utils import _merge_yaml_and_cli_args

    monkeypatch.setenv("PACKRL_CACHE", "/somewhere")
    monkeypatch.delenv("PACKRL_OUTPUT_DIR", raising=False)
    yaml = OmegaConf.to_container(_cpu_config(), resolve=False)
    cfg = _merge_yaml_and_cli_args(Namespace(**yaml), ["max_steps=2", "grpo.group_size=4"])
    assert cfg.model_dir == "/somewhere/SmolLM2-135M-Instruct"
    assert cfg.tokenizer.path == cfg.model_dir == cfg.checkpointer.checkpoint_dir
    assert cfg.output_dir == "outputs/smollm2_135m_arithmetic_full_cpu"
    assert cfg.max_steps == 2 and cfg.grpo.group_size == 4
    validate_config(cfg)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_step", 2, "unknown key 'max_step'; did you mean 'max_steps'?"),
        ("grpo.group_sise", 4, "unknown key 'grpo.group_sise'; did you mean 'grpo.group_size'?"),
        ("loss.beta", "zero", "'loss.beta' must be int or float, got str 'zero'"),
        ("max_steps", 2.5, "'max_steps' must be int, got float 2.5"),
        ("max_steps", True, "'max_steps' must be int, got bool True"),
        ("grpo.scale_rewards", "std", "'grpo.scale_rewards' must be one of ['group', 'batch', "),
        ("optimizer.lrr", 1e-5, "unknown key 'optimizer.lrr': torch.optim.AdamW takes no "),
        ("sampler.max_batch", 8, "did you mean 'sampler.max_batch_size'?"),
        ("sampler.pad_id", 0, "'sampler.pad_id' is set by the recipe"),
        ("task.n_trian", 5, "did you mean 'task.n_train'?"),
        ("model._component_", "packrl.models.nope", "cannot import 'packrl.models.nope'"),
        ("packing", 1024, "'packing' must be a section"),
    ],
)
def test_bad_key_is_named(key, value, message):
    cfg = _cpu_config()
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_missing_required_key():
    cfg = _cpu_config()
    del cfg.grpo["group_size"]
    with pytest.raises(ConfigError, match="missing required key 'grpo.group_size'"):
        validate_config(cfg)


def test_errors_are_collected():
    cfg = _cpu_config()
    cfg.seeed = 1
    cfg.eval.temprature = 0.0
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "'seeed'" in str(err.value) and "'eval.temprature'" in str(err.value)


@pytest.mark.parametrize(
    "key, value, message",
    [  # every value here used to pass validation and fail late, or silently train nothing
        ("grpo.group_size", 1, "'grpo.group_size' must be >= 2, got 1 (advantages are relative"),
        ("max_steps", -1, "'max_steps' must be >= 1, got -1"),
        ("grpo.prompts_per_step", 0, "'grpo.prompts_per_step' must be >= 1, got 0"),
        ("grpo.num_passes", 0, "'grpo.num_passes' must be >= 1, got 0"),
        ("eval.num_samples", 0, "'eval.num_samples' must be >= 1, got 0"),
        ("keep_last_checkpoints", 0, "'keep_last_checkpoints' must be >= 1, got 0"),
        ("grpo.temperature", 0, "'grpo.temperature' must be > 0, got 0"),
        ("grpo.top_p", 1.5, "'grpo.top_p' must be > 0 and <= 1, got 1.5"),
        ("grpo.max_new_tokens", 0, "'grpo.max_new_tokens' must be >= 1, got 0"),
        (
            "grpo.max_new_tokens",
            1024,
            "'grpo.max_new_tokens' (1024) must be below 'packing.row_len'",
        ),
        ("loss.epsilon_low", "x", "'loss.epsilon_low' must be int or float, got str 'x'"),
        ("mixed_precision", "fp16", "'mixed_precision' must be one of [None, 'bf16'], got 'fp16'"),
        ("dtype", "bf16", "'mixed_precision: bf16' computes in bf16 over fp32 weights"),
    ],
)
def test_out_of_range_value_is_named_with_its_range(key, value, message):
    cfg = _cpu_config()
    if key == "dtype":  # the relation with mixed_precision
        OmegaConf.update(cfg, "mixed_precision", "bf16", force_add=True)
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_defaults_live_in_the_schema():
    from packrl.training.config_schema import with_defaults

    cfg = _cpu_config()
    for key in ("temperature", "top_p", "num_passes"):
        del cfg.grpo[key]
    del cfg["loss"], cfg["eval"]
    validate_config(cfg)
    full = with_defaults(cfg)
    assert (full.grpo.temperature, full.grpo.top_p, full.grpo.num_passes) == (1.0, 1.0, 1)
    assert full.loss._component_ == "packrl.rl.loss.GRPOLoss"
    assert full.eval.num_samples == 1 and full.eval.every_n_steps is None
    assert "temperature" not in cfg.grpo  # the input is not changed
