"""Config validation: every shipped config is valid; bad keys are named errors."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from packrl.training.config_schema import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "tune_configs").glob("*.yaml"))


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
        ("grpo.beta", "zero", "'grpo.beta' must be int or float, got str 'zero'"),
        ("max_steps", 2.5, "'max_steps' must be int, got float 2.5"),
        ("max_steps", True, "'max_steps' must be int, got bool True"),
        ("grpo.loss_type", "ppo", "'grpo.loss_type' must be one of ['grpo', 'dapo', 'dr_grpo']"),
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
