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
from conftest import ROOT, TINY_ARCH, TINY_RUN, step_metrics, tune_env
from omegaconf import OmegaConf

from recipes.grpo import GRPORecipe

TUNE = str(Path(sys.executable).parent / "tune")
FULL = "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml"
LORA = "tune_configs/smollm2_135m_arithmetic_lora_cpu.yaml"
TINY = [*TINY_RUN, "keep_last_checkpoints=None"]
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
    "packing/fill",
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


def _tune(config: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(config, out, *overrides),
        cwd=ROOT,
        env=tune_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"tune run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _completions(out: Path, step: int) -> list[str]:
    lines = (out / "completions.jsonl").read_text().splitlines()
    return [r["completion"] for r in map(json.loads, lines) if r["step"] == step]


@pytest.mark.slow
def test_full_run_then_kill_after_checkpoint_and_resume(tmp_path):
    """`tune run` full fine-tuning works and logs everything; a run SIGKILLed after its step-2
    checkpoint and resumed gives the same step 3 as an uninterrupted run."""
    # Uninterrupted: 3 steps, checkpoint at 2 and at the end.
    # keep_last_checkpoints=1: each full checkpoint with its AdamW state is 1.6 GB on disk.
    args = ("max_steps=3", "save_every_n_steps=2", "keep_last_checkpoints=1")
    ref = tmp_path / "uninterrupted"
    proc = _tune(FULL, ref, *args)
    for line in ("checkpoint:", "logs:", "plot:"):
        assert line in proc.stdout
    metrics = step_metrics(ref)
    assert sorted(metrics) == [1, 2, 3]
    for step in (1, 2, 3):
        missing = [k for k in STEP_KEYS if k not in metrics[step]]
        assert not missing, f"step {step} lacks {missing}"
    assert "eval/accuracy" in metrics[2] and "eval/accuracy" in metrics[3]
    assert metrics[1]["grad_norm"] > 0.0  # the test reward gives real advantages
    assert (ref / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_completions(ref, 1)) == 8  # log_num_completions: 8
    step3 = ref / "checkpoints" / "step_3"
    assert (step3 / "model.safetensors").is_file() and (step3 / "training_state.pt").is_file()
    assert (ref / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert not (ref / "checkpoints" / "step_2").exists()  # keep_last_checkpoints=1

    # Interrupted: SIGKILL as soon as the step-2 checkpoint is complete, then resume.
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(FULL, run, *args),
        cwd=ROOT,
        env=tune_env(),
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
    assert 3 not in step_metrics(run)

    _tune(FULL, run, *args, "resume_from_checkpoint=true")
    resumed = step_metrics(run)[3]
    # Same sampled tokens (RNG, weights, data position restored), the same loss and the same
    # gradient. Tolerance 1e-6 (relative for the gradient norm); measured difference: 0.
    assert _completions(run, 3) == _completions(ref, 3)
    assert resumed["reward/mean"] == metrics[3]["reward/mean"]
    assert resumed["loss/policy_loss"] == pytest.approx(metrics[3]["loss/policy_loss"], abs=1e-6)
    assert resumed["grad_norm"] == pytest.approx(metrics[3]["grad_norm"], rel=1e-6)
    assert resumed["eval/accuracy"] == metrics[3]["eval/accuracy"]


@pytest.mark.slow
def test_lora_run_writes_adapters(tmp_path):
    out = tmp_path / "lora"
    proc = _tune(LORA, out, "max_steps=2", "save_every_n_steps=1")
    assert "LoRA fine-tuning" in proc.stdout + proc.stderr
    metrics = step_metrics(out)
    assert sorted(metrics) == [1, 2] and metrics[2]["grad_norm"] > 0.0
    step1, step2 = out / "checkpoints" / "step_1", out / "checkpoints" / "step_2"
    # Periodic checkpoints: PEFT adapters only; the last one also has the merged model.
    assert (step1 / "adapter_model.safetensors").is_file()
    assert not (step1 / "model.safetensors").exists()
    assert (step2 / "adapter_model.safetensors").is_file() and (
        step2 / "model.safetensors"
    ).is_file()
    assert json.loads((step2 / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grpo.temperature=0"], "'grpo.temperature' must be > 0, got 0"),
        (["device=cuda"], "torch sees no CUDA device"),
        (["loss.epsilon_low=-0.1"], "'loss.epsilon_low' must be in [0, 1], got -0.1"),
        ([], "already holds a run"),  # output_dir has a metrics.jsonl from an earlier run
    ],
)
def test_start_up_errors_name_the_key_before_the_model_loads(tmp_path, overrides, message):
    if not overrides:
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    # A checkpointer pointing nowhere: reaching the model load would fail with another error.
    proc = subprocess.run(
        _cmd(FULL, tmp_path, *overrides, "checkpointer.checkpoint_dir=/nonexistent"),
        cwd=ROOT,
        env=tune_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "/nonexistent" not in proc.stderr.split("Traceback")[-1]


def test_bad_config_key_is_a_named_error(tmp_path):
    proc = subprocess.run(
        _cmd(FULL, tmp_path, "grpo.group_sise=4"),
        cwd=ROOT,
        env=tune_env(),
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
    _, recipe.offload_activations = recipe._activation_memory_plan(recipe.model)
    assert recipe.offload_activations  # explicitly asked for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = recipe._activation_offloading()
    assert any("enable_activation_offloading" in str(w.message) for w in caught)
    with ctx:  # a no-op context: the forward still works
        assert recipe.model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)


# ------------------------------------------------------- the whole loop on a tiny model
def _tiny_recipe(model_dir: Path, out: Path, lora: bool = False, **overrides) -> GRPORecipe:
    model = {"_component_": "torchtune.models.llama3_2.llama3_2", **TINY_ARCH}
    if lora:
        model["_component_"] = "torchtune.models.llama3_2.lora_llama3_2"
        model.update(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8.0)
    settings = {
        "model_dir": str(model_dir),
        "output_dir": str(out),
        "model": model,
        "max_steps": 3,
        "task.n_train": 20,
        "task.n_eval": 4,
        "grpo.prompts_per_step": 3,
        "grpo.group_size": 4,
        "grpo.max_new_tokens": 8,
        "grpo.drop_uniform_groups": False,
        "packing.row_len": 128,  # 3 groups of about 80 tokens: 2-3 rows
        "packing.tokens_per_micro_batch": 128,
        "rewards.reward_funcs": ["recipe_test_rewards.distinct_chars"],
        "eval.max_new_tokens": 8,
        "enable_activation_checkpointing": False,
        # fp32 throughout: these tests compare updates to 1e-4 (the shipped bf16 settings run
        # in the SmolLM2 tests above and in the bf16 variant of test_recipe_variants.py)
        "mixed_precision": None,
        "sampler.dtype": "fp32",
        **overrides,
    }
    cfg = OmegaConf.load(ROOT / FULL)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    recipe = GRPORecipe(cfg)
    recipe.setup()
    return recipe


def _step(recipe: GRPORecipe) -> dict:
    metrics = recipe.train_step()
    recipe.step += 1
    return metrics


def test_tiny_resume_in_process_continues_exactly(tiny_model_dir, tmp_path):
    a = _tiny_recipe(tiny_model_dir, tmp_path)
    _step(a), _step(a)
    a.save_checkpoint()
    expected = _step(a)  # the uninterrupted step 3
    a.run_lock.release()  # what the end of a's process would do
    b = _tiny_recipe(tiny_model_dir, tmp_path, resume_from_checkpoint=True)
    assert (b.step, b.data_position) == (2, 6)
    got = _step(b)
    assert expected["grad_norm"] > 0
    for key in ("reward/mean", "loss/policy_loss", "grad_norm", "lr", "entropy"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_tiny_micro_batch_split_gives_the_same_update(tiny_model_dir, tmp_path):
    """One micro-batch per row or all rows at once: the same loss, gradient and weights."""
    split = _tiny_recipe(tiny_model_dir, tmp_path / "split")
    whole = _tiny_recipe(
        tiny_model_dir, tmp_path / "whole", **{"packing.tokens_per_micro_batch": 1024}
    )
    ms, mw = _step(split), _step(whole)
    assert ms["packing/rows"] >= 2  # really split
    assert ms["loss/policy_loss"] == pytest.approx(mw["loss/policy_loss"], abs=1e-6)
    assert ms["grad_norm"] == pytest.approx(mw["grad_norm"], rel=1e-4)
    for ps, pw in zip(split.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(ps, pw, rtol=1e-4, atol=1e-6)


def test_tiny_lora_trains_adapters_only_and_evaluates(tiny_model_dir, tmp_path):
    recipe = _tiny_recipe(tiny_model_dir, tmp_path, lora=True, **{"loss.beta": 0.1})
    assert recipe.is_lora and recipe.reference is not None  # adapters-disabled reference
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    metrics = _step(recipe)
    changed = {n for n, p in recipe.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert metrics["loss/kl"] >= 0 and metrics["time/reference_s"] > 0
    result = recipe.evaluate()
    assert set(result) == {"eval/accuracy", "eval/reward"} and 0 <= result["eval/accuracy"] <= 1


@pytest.mark.parametrize(
    "need, kept, budget, device, settings, plan",
    [  # (checkpointing, offloading) settings -> what runs
        (10, 1, 5, "cpu", ("auto", "auto"), (True, False)),  # nothing to offload to on CPU
        (10, 1, 50, "cpu", ("auto", "auto"), (False, False)),
        (10, 1, 5, "cuda", ("auto", "auto"), (True, False)),  # checkpointing is enough
        (10, 8, 5, "cuda", ("auto", "auto"), (True, True)),  # even the layer inputs overflow
        (10, 8, 5, "cuda", (False, "auto"), (False, True)),
        (10, 8, 50, "cuda", (True, "auto"), (True, False)),
        (10, 8, 5, "cuda", ("auto", False), (True, False)),
        (10, 8, 50, "cpu", (False, True), (False, True)),  # explicit: the recipe warns on CPU
    ],
)
def test_activation_memory_plan(need, kept, budget, device, settings, plan):
    from packrl.training.memory import plan_activation_memory

    got = plan_activation_memory(
        *settings, need=need, need_checkpointed=kept, budget=budget, device_type=device
    )
    assert got == plan


@pytest.mark.parametrize("budget_gb, wrapped", [(1e-4, True), (64.0, False)])
def test_activation_checkpointing_auto_follows_the_budget(
    tiny_model_dir, tmp_path, budget_gb, wrapped
):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from packrl.training.memory import activation_bytes

    recipe = _tiny_recipe(
        tiny_model_dir,
        tmp_path,
        enable_activation_checkpointing="auto",
        enable_activation_offloading="auto",
        activation_memory_budget_gb=budget_gb,
    )
    # the tiny llama: (10 * 64 + 2 * 128) elements x 2 layers x 128 tokens x 4 bytes
    assert activation_bytes(recipe.model, 128, torch.float32) == 896 * 2 * 128 * 4
    assert recipe.offload_activations is False  # auto never offloads on CPU
    has_wrappers = any(isinstance(m, CheckpointWrapper) for m in recipe.model.modules())
    assert has_wrappers == wrapped
    _step(recipe)  # trains either way
