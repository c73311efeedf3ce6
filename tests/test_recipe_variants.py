"""Each GRPO variant for 2 steps through `tune run` (tiny random llama): it runs, trains and
logs its own metrics. The variants' math is pinned in tests/test_loss_variants.py."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, step_metrics, tiny_tune_config, tune_env

TUNE = str(Path(sys.executable).parent / "tune")

VARIANTS = {
    "gspo": {"loss.importance_ratio": "sequence", "loss.epsilon_low": 3e-4,
             "loss.epsilon_high": 4e-4},
    "cispo": {"loss.policy_loss": "cispo", "loss.epsilon_low": 1.0, "loss.epsilon_high": 4.0},
    "rollout_correction": {"loss.rollout_correction": "mask", "grpo.num_passes": 2},
    "dynamic_sampling": {"grpo.dynamic_sampling": True, "grpo.max_sampling_rounds": 3},
    "overlong": {"loss.mask_truncated_completions": True, "loss.loss_type": "dapo"},
    "batch_scaling": {"grpo.scale_rewards": "batch"},
    "bf16": {"mixed_precision": "bf16", "sampler.dtype": "bf16"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_runs_two_steps(tmp_path, tiny_model_dir, name):
    out = tmp_path / "out"
    config = tiny_tune_config(
        tmp_path / "c.yaml", tiny_model_dir, out, max_steps=2, **VARIANTS[name]
    )
    proc = subprocess.run(
        [TUNE, "run", "recipes/grpo.py", "--config", str(config)],
        cwd=ROOT,
        env=tune_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = step_metrics(out)
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        if name == "overlong" and m["truncated_frac"] == 1.0:
            assert m["grad_norm"] == 0.0  # every completion cut: all masked out of the loss
        else:
            assert m["grad_norm"] > 0 and m["loss/tokens"] > 0
    if name == "rollout_correction":  # native sampler: trainer and sampler agree
        assert metrics[1]["loss/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert metrics[1]["loss/is_truncated_frac"] == 0.0
    if name == "bf16":  # bf16 sampler: rollout correction "auto" is on, the drift is visible
        assert 0 < metrics[1]["rollout/logprob_drift"] < 0.1
        assert 0.8 < metrics[1]["loss/is_weight_mean"] < 1.2
        assert metrics[1]["loss/is_weight_mean"] != 1.0  # exactly 1 when the correction is off
    if name == "dynamic_sampling":
        assert all(m["rollout/prompts_drawn"] in (2, 4, 6) for m in metrics.values())
        assert all(m["groups_kept"] <= 2 for m in metrics.values())
