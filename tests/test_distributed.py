"""The recipe under `tune run --nproc_per_node 2` (FSDP2 on CPU, gloo) against one process.

Both runs sample the same completions (per-prompt seeds), so they train on the same batch:
the two ranks split its rows, and their summed gradient must be the one process's gradient.

Tolerances (fp32): the ranks add the same per-token terms in another order, so losses and
gradient norms agree to 1e-4 relative; with SGD the weight update is lr * gradient, and the
two updates agree to 1e-3 of the update's size (measured: about 1e-5).
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_ARCH, step_metrics, tune_env
from omegaconf import OmegaConf
from safetensors.torch import load_file

TUNE = str(Path(sys.executable).parent / "tune")
FULL = ROOT / "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml"
SMALL = {
    "grpo.prompts_per_step": 4,  # 4 groups of ~120 tokens: 2 rows of 256, one per rank
    "grpo.group_size": 4,
    "grpo.max_new_tokens": 16,
    "grpo.drop_uniform_groups": False,
    "packing.row_len": 256,
    "packing.tokens_per_micro_batch": 256,
    "rewards.reward_funcs": ["recipe_test_rewards.distinct_chars"],
    "mixed_precision": None,  # fp32 throughout: one rank and two must agree to 1e-4
    "sampler.dtype": "fp32",
    "eval.at_start": False,
    "eval.every_n_steps": 1,
    "eval.num_rows": 3,  # odd: one rank evaluates more rows than the other
    "eval.max_new_tokens": 8,
    "save_every_n_steps": 1,
    "keep_last_checkpoints": None,
    "plot": False,
}


def _config(path: Path, out: Path, **settings) -> Path:
    cfg = OmegaConf.load(FULL)
    for key, value in {"output_dir": str(out), **SMALL, **settings}.items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.save(cfg, path)
    return path


def _tune(config: Path, nproc: int = 1, nodes: int = 1) -> None:
    """`tune run` with `nproc` ranks per node; with `nodes` > 1, one launcher per "node", all on
    127.0.0.1, meeting through torchrun's c10d rendezvous as separate machines do."""
    env = tune_env()
    launch = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    if nodes > 1:
        port = _free_port()
        launch = [
            *("--nnodes", str(nodes), "--nproc_per_node", str(nproc)),
            *("--rdzv_id", "packrl-test", "--rdzv_backend", "c10d"),
            *("--rdzv_endpoint", f"127.0.0.1:{port}"),
        ]
    cmd = [TUNE, "run", *launch, "recipes/grpo.py", "--config", str(config)]
    # Logs go to files: a launcher blocked on a full pipe would stall the others' collectives.
    logs = [config.with_suffix(f".node{i}.log") for i in range(nodes)]
    procs = []
    for log in logs:
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=f))
    for proc, log in zip(procs, logs, strict=True):
        proc.wait(timeout=900)
        assert proc.returncode == 0, f"tune run failed:\n{log.read_text()[-8000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_step(one: dict, two: dict) -> None:
    for key in ("reward/mean", "reward/std", "loss/tokens", "packing/rows", "eval/reward"):
        assert two[key] == one[key], key  # the same rollouts, batch and evaluation
    # (on-policy the surrogate loss is a sum of advantages, ~0: its noise is ~1e-6)
    for key in ("loss/policy_loss", "loss/kl", "entropy", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
    # both samplers score their tokens as the trainer does (fp32, on-policy)
    assert one["rollout/logprob_drift"] < 1e-4 and two["rollout/logprob_drift"] < 1e-4


@pytest.mark.slow
def test_two_ranks_train_like_one_process_smollm2(tmp_path, smollm2_dir):
    """Full fine-tuning of SmolLM2 with a KL term (so the sharded reference runs too), the two
    ranks launched as two single-rank nodes (the multi-node path)."""
    settings = {
        "max_steps": 1,
        "loss.beta": 0.05,
        "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.05},
    }
    one, two = tmp_path / "one", tmp_path / "two"
    _tune(_config(tmp_path / "one.yaml", one, **settings))
    _tune(_config(tmp_path / "two.yaml", two, **settings), nproc=1, nodes=2)

    m1, m2 = step_metrics(one)[1], step_metrics(two)[1]
    assert m1["packing/rows"] == 2 and m1["grad_norm"] > 0
    _assert_same_step(m1, m2)

    # One consolidated HF checkpoint, written by rank 0: the same update as one process.
    source = load_file(Path(smollm2_dir) / "model.safetensors")
    w1 = load_file(one / "checkpoints/step_1/model.safetensors")
    w2 = load_file(two / "checkpoints/step_1/model.safetensors")
    assert w1.keys() == w2.keys() == source.keys()
    d1 = torch.cat([(w1[k] - source[k]).flatten() for k in sorted(source)])
    d2 = torch.cat([(w2[k] - source[k]).flatten() for k in sorted(source)])
    assert d1.norm() > 0
    assert (d2 - d1).norm() <= 1e-3 * d1.norm()

    # ... and it loads as a transformers model, which scores like the one-process weights.
    transformers = pytest.importorskip("transformers")
    tokens = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 2]])
    logits = []
    for out in (one, two):
        model = transformers.AutoModelForCausalLM.from_pretrained(out / "checkpoints/step_1")
        with torch.no_grad():
            logits.append(model.eval()(tokens).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_two_ranks_lora_resume_exactly_and_match_one_process(tmp_path, tiny_model_dir):
    """LoRA (reference: adapters off) on a tiny random llama: 2 steps on 2 ranks equal 2 steps
    in one process, and a 2-rank run stopped after step 1 and resumed equals both."""
    lora = {
        "model_dir": str(tiny_model_dir),
        "model": {
            "_component_": "torchtune.models.llama3_2.lora_llama3_2",
            **TINY_ARCH,
            "lora_attn_modules": ["q_proj", "v_proj"],
            "lora_rank": 4,
            "lora_alpha": 8.0,
        },
        "loss.beta": 0.1,
        "optimizer.lr": 1e-3,
        # a constant LR: the interrupted run stops at max_steps=1, and a cosine schedule
        # depends on max_steps
        "lr_scheduler": None,
        "enable_activation_checkpointing": True,
    }
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    _tune(_config(tmp_path / "one.yaml", one, max_steps=2, **lora))
    _tune(_config(tmp_path / "two.yaml", two, max_steps=2, **lora), nproc=2)
    _tune(_config(tmp_path / "r1.yaml", resumed, max_steps=1, **lora), nproc=2)
    _tune(
        _config(tmp_path / "r2.yaml", resumed, max_steps=2, resume_from_checkpoint=True, **lora),
        nproc=2,
    )

    m1, m2, mr = step_metrics(one), step_metrics(two), step_metrics(resumed)
    assert m1[2]["grad_norm"] > 0
    for step in (1, 2):
        _assert_same_step(m1[step], m2[step])
    for key in ("reward/mean", "loss/policy_loss", "loss/kl", "grad_norm", "eval/reward"):
        assert mr[2][key] == pytest.approx(m2[2][key], rel=1e-6, abs=1e-9), key

    adapter = "checkpoints/step_2/adapter_model.safetensors"
    a1, a2, ar = (load_file(out / adapter) for out in (one, two, resumed))
    assert a1.keys() == a2.keys() == ar.keys() and len(a1) == 8  # q, v x A, B x 2 layers
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ar[k], a2[k], rtol=1e-6, atol=1e-8)
