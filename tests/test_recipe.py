"""The GRPO recipe through `tune run`, as a user runs it, plus fast checks of its glue.

The `tune run` tests use the real SmolLM2-135M on CPU with tiny settings (2 prompts x 4
samples, 16 new tokens, 256-token rows) and a reward that differs between almost any two
texts (tests/recipe_test_rewards.py), so that every step really updates the weights.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recipes.grpo import GRPORecipe

ROOT = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")
FULL = "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml"
LORA = "tune_configs/smollm2_135m_arithmetic_lora_cpu.yaml"
TINY = [
    "grpo.prompts_per_step=2",
    "grpo.group_size=4",
    "grpo.max_new_tokens=16",
    "grpo.drop_uniform_groups=false",
    "packing.row_len=256",
    "packing.tokens_per_micro_batch=256",
    "rewards.reward_funcs=[recipe_test_rewards.distinct_chars]",
    "eval.at_start=false",
    "eval.every_n_steps=2",
    "eval.num_rows=2",
    "eval.max_new_tokens=16",
    "keep_last_checkpoints=None",
]
# Keys every training step logs (the list).
STEP_KEYS = [
    "reward/mean",
    "reward/std",
    "reward/distinct_chars/mean",
    "reward/distinct_chars/std",
    "accuracy",
    "loss/kl",
    "loss/clip_frac_low",
    "loss/clip_frac_high",
    "loss/policy_loss",
    "entropy",
    "completion_len/mean",
    "completion_len/min",
    "completion_len/max",
    "truncated_frac",
    "tokens_per_s/generation",
    "tokens_per_s/training",
    "packing/saved_fraction",
    "time/generation_s",
    "time/training_s",
    "time/reference_s",
    "memory/peak_rss_gb",
]


def _cmd(config: str, out: Path, *overrides: str) -> list[str]:
    return [
        TUNE,
        "run",
        "recipes/grpo.py",
        "--config",
        config,
        f"output_dir={out}",
        *TINY,
        *overrides,
    ]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def _tune(config: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(config, out, *overrides),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"tune run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _metrics(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def _completions(out: Path, step: int) -> list[str]:
    lines = (out / "completions.jsonl").read_text().splitlines()
    return [r["completion"] for r in map(json.loads, lines) if r["step"] == step]


@pytest.mark.slow
def test_full_run_then_kill_after_checkpoint_and_resume(tmp_path):
    """`tune run` full fine-tuning works and logs everything; a run SIGKILLed after its step-2
    checkpoint and resumed gives the same step 3 as an uninterrupted run."""
    # Uninterrupted: 3 steps, checkpoint at 2 and at the end.
    ref = tmp_path / "uninterrupted"
    proc = _tune(FULL, ref, "max_steps=3", "save_every_n_steps=2")
    for line in ("checkpoint:", "logs:", "plot:"):
        assert line in proc.stdout
    metrics = _metrics(ref)
    assert sorted(metrics) == [1, 2, 3]
    for step in (1, 2, 3):
        missing = [k for k in STEP_KEYS if k not in metrics[step]]
        assert not missing, f"step {step} lacks {missing}"
    assert "eval/accuracy" in metrics[2] and "eval/accuracy" in metrics[3]
    assert metrics[1]["loss/policy_loss"] != 0.0  # the test reward gives real advantages
    assert (ref / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_completions(ref, 1)) == 8  # log_num_completions: 8
    step3 = ref / "checkpoints" / "step_3"
    assert (step3 / "model.safetensors").is_file() and (step3 / "training_state.pt").is_file()
    assert (ref / "checkpoints" / "latest").read_text().strip() == "step_3"

    # Interrupted: SIGKILL as soon as the step-2 checkpoint is complete, then resume.
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(FULL, run, "max_steps=3", "save_every_n_steps=2"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its reward worker processes die with it
    )
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 900
    while not (latest.is_file() and latest.read_text().strip() == "step_2"):
        assert proc.poll() is None, "the run ended before its step-2 checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 3 not in _metrics(run)

    _tune(FULL, run, "max_steps=3", "save_every_n_steps=2", "resume_from_checkpoint=true")
    resumed = _metrics(run)[3]
    # Same sampled tokens (RNG, weights, data position restored) and the same loss. Measured
    # difference: 0 (bitwise); the tolerance allows for other BLAS thread schedules.
    assert _completions(run, 3) == _completions(ref, 3)
    assert resumed["reward/mean"] == metrics[3]["reward/mean"]
    assert resumed["loss/policy_loss"] == pytest.approx(metrics[3]["loss/policy_loss"], abs=1e-6)
    assert resumed["eval/accuracy"] == metrics[3]["eval/accuracy"]


@pytest.mark.slow
def test_lora_run_writes_adapters(tmp_path):
    out = tmp_path / "lora"
    proc = _tune(LORA, out, "max_steps=2", "save_every_n_steps=1")
    assert "LoRA fine-tuning" in proc.stdout + proc.stderr
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2] and metrics[2]["loss/policy_loss"] != 0.0
    step1, step2 = out / "checkpoints" / "step_1", out / "checkpoints" / "step_2"
    # Periodic checkpoints: PEFT adapters only; the last one also has the merged model.
    assert (step1 / "adapter_model.safetensors").is_file()
    assert not (step1 / "model.safetensors").exists()
    assert (step2 / "adapter_model.safetensors").is_file() and (
        step2 / "model.safetensors"
    ).is_file()
    assert json.loads((step2 / "adapter_config.json").read_text())["r"] == 16


def test_bad_config_key_is_a_named_error(tmp_path):
    proc = subprocess.run(
        _cmd(FULL, tmp_path, "grpo.group_sise=4"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "unknown key 'grpo.group_sise'; did you mean 'grpo.group_size'?" in proc.stderr


# ----------------------------------------------------------------------- in-process glue
def _recipe(**overrides) -> GRPORecipe:
    cfg = OmegaConf.load(ROOT / FULL)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return GRPORecipe(cfg)


def test_data_order_is_seeded_and_resumable(tmp_path):
    from packrl.tasks.arithmetic import arithmetic_task

    task = arithmetic_task(n_train=5, n_eval=0)
    a = _recipe(output_dir=str(tmp_path))
    a.task = task
    rows = [r["messages"][-1]["content"] for r in a.next_rows(12)]
    questions = [r["messages"][-1]["content"] for r in task.train]
    for epoch in range(2):  # each epoch is a permutation of the rows
        assert sorted(rows[5 * epoch : 5 * epoch + 5]) == sorted(questions)
    assert rows[:5] != rows[5:10]  # and a fresh one per epoch
    b = _recipe(output_dir=str(tmp_path))  # a resumed run: same seed, position restored
    b.task, b.data_position = task, 7
    assert [r["messages"][-1]["content"] for r in b.next_rows(5)] == rows[7:12]
    c = _recipe(output_dir=str(tmp_path), seed=1)
    c.task = task
    assert [r["messages"][-1]["content"] for r in c.next_rows(12)] != rows


def test_activation_offloading_on_cpu_warns_and_is_ignored(tmp_path):
    from torchtune.models.llama3_2 import llama3_2

    recipe = _recipe(output_dir=str(tmp_path), enable_activation_offloading=True)
    recipe.model = llama3_2(
        vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
        max_seq_len=32, intermediate_dim=32,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = recipe._activation_offloading()
    assert any("enable_activation_offloading" in str(w.message) for w in caught)
    with ctx:  # a no-op context: the forward still works
        assert recipe.model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)
