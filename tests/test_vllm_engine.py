"""VLLMSampler (in-process vLLM) against the trainer's own forward pass, on SmolLM2.

The tests marked ``vllm`` skip when vLLM is not installed (``./setup.sh --vllm`` installs it).
Each engine is built once per module: starting one takes 20-60 s on 2 CPU cores.
"""

import copy
import sys

import pytest
import torch

from packrl.checkpointing import save_checkpoint
from packrl.models import load_smollm2
from packrl.rollout.vllm_engine import VLLMSampler

# Both sides run SmolLM2 in fp32; they differ in kernels and summation order only. Measured
# max |diff| on this machine: about 1e-5 (see docs/vllm.md), so 2e-3 leaves room for other
# CPUs while staying far below the effect of every weight change below (> 0.1).
LOGPROB_ATOL = 2e-3
STOP = [2]  # <|im_end|>
MAX_MODEL_LEN = 256
QUESTIONS = ["What is 17 + 25?", "Name a colour of the sky."]
NEEDS_VLLM = "vLLM is not installed (./setup.sh --vllm installs the CPU build)"


def max_logprob_diff(model, prompts, results, temperature: float) -> float:
    """Largest |vLLM logprob - trainer logprob| over all sampled tokens, where the trainer's
    logprob is log softmax(logits / T) from one batched forward over prompt + completion."""
    seqs = [(p, c) for p, samples in zip(prompts, results, strict=True) for c in samples]
    width = max(len(p) + len(c.token_ids) for p, c in seqs)
    # Right padding: the model is causal, so it never changes the logits of earlier positions.
    tokens = torch.tensor(
        [p + c.token_ids + [0] * (width - len(p) - len(c.token_ids)) for p, c in seqs]
    )
    with torch.no_grad():
        logits = model(tokens).float()  # [N, width, V]
    if temperature > 0:
        logits = logits / temperature
    logprobs = logits.log_softmax(-1)
    diffs = []
    for row, (p, c) in enumerate(seqs):
        steps = torch.arange(len(p) - 1, len(p) - 1 + len(c.token_ids))
        trainer = logprobs[row, steps, torch.tensor(c.token_ids)]  # [C]
        diffs.append((torch.tensor(c.logprobs) - trainer).abs())
    return float(torch.cat(diffs).max())


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return [
        smollm2_tokenizer.tokenize_messages([{"role": "user", "content": q}]) for q in QUESTIONS
    ]


# What the trainer's process looked like around the engine's start-up.
STARTUP: dict = {}


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    pytest.importorskip("vllm", reason=NEEDS_VLLM)
    torch.manual_seed(1234)
    STARTUP["rng_before"] = torch.get_rng_state()
    sampler = VLLMSampler(smollm2_dir, stop_token_ids=STOP, max_model_len=MAX_MODEL_LEN, seed=0)
    STARTUP["rng_after"] = torch.get_rng_state()
    return sampler


@pytest.fixture(scope="module")
def lora_engine(smollm2_dir):
    pytest.importorskip("vllm", reason=NEEDS_VLLM)
    return VLLMSampler(
        smollm2_dir,
        stop_token_ids=STOP,
        max_model_len=MAX_MODEL_LEN,
        seed=0,
        enable_lora=True,
        max_lora_rank=8,
    )


def test_missing_vllm_says_how_to_install(smollm2_dir, monkeypatch):
    """Runs everywhere: with vLLM hidden, the error names both ways forward."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"setup\.sh --vllm.*native sampler"):
        VLLMSampler(smollm2_dir, stop_token_ids=STOP, max_model_len=MAX_MODEL_LEN)


@pytest.mark.vllm
@pytest.mark.slow
def test_startup_leaves_trainer_process_alone(engine):
    """vLLM reseeds the global RNGs and disables torch.set_num_threads; both are undone."""
    assert torch.equal(STARTUP["rng_before"], STARTUP["rng_after"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.vllm
@pytest.mark.slow
def test_sampled_logprobs_match_trainer(engine, smollm2_model, prompts):
    results = engine.generate(prompts, num_samples=3, max_new_tokens=16, temperature=0.8, seed=123)
    assert [len(r) for r in results] == [3, 3]
    for samples in results:
        for c in samples:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert all(lp <= 0 for lp in c.logprobs)
            # finished <=> ends with a stop token; otherwise it ran to max_new_tokens.
            assert c.finished == (c.token_ids[-1] in STOP)
            assert c.finished or len(c.token_ids) == 16
            assert not any(t in STOP for t in c.token_ids[:-1])
        assert len({tuple(c.token_ids) for c in samples}) > 1, "samples of a prompt all equal"
    assert max_logprob_diff(smollm2_model, prompts, results, 0.8) < LOGPROB_ATOL


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_follows_trainer_argmax(engine, smollm2_model, prompts):
    (greedy,) = engine.generate(prompts[:1], max_new_tokens=12, temperature=0.0)[0]
    seq = prompts[0] + greedy.token_ids
    with torch.no_grad():
        logits = smollm2_model(torch.tensor([seq]))[0]
    argmax = logits[len(prompts[0]) - 1 : -1].argmax(-1).tolist()
    assert greedy.token_ids == argmax
    assert max_logprob_diff(smollm2_model, prompts[:1], [[greedy]], 0.0) < LOGPROB_ATOL


@pytest.mark.vllm
@pytest.mark.slow
def test_seeds_reproduce(engine, prompts):
    def run(seed):
        out = engine.generate(prompts, num_samples=2, max_new_tokens=8, seed=seed)
        return [[c.token_ids for c in samples] for samples in out]

    first = run(7)
    assert run(7) == first
    assert run(8) != first


@pytest.mark.vllm
@pytest.mark.slow
def test_bad_arguments_name_the_field(engine, prompts):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompts, max_new_tokens=8, top_p=0.9)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(prompts, max_new_tokens=MAX_MODEL_LEN)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate([prompts[0], []], max_new_tokens=8)


@pytest.mark.vllm
@pytest.mark.slow
def test_full_weight_update_followed(engine, smollm2_dir, prompts):
    """Perturb every weight, the tied embedding included, push, and check vLLM follows."""
    base = load_smollm2(smollm2_dir)
    new = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.std())

    def check(model, other):
        results = engine.generate(prompts, num_samples=2, max_new_tokens=12, seed=5)
        assert max_logprob_diff(model, prompts, results, 1.0) < LOGPROB_ATOL
        # The weights pushed make a difference far above the tolerance.
        assert max_logprob_diff(other, prompts, results, 1.0) > 50 * LOGPROB_ATOL

    check(base, new)  # also warms the prefix cache with the old weights' KV
    engine.update_weights(new)
    check(new, base)
    engine.update_weights(base)  # put the module's engine back as it was
    check(base, new)


def _randomize_lora(model, seed: int) -> None:
    """Gives the LoRA B matrices (zero at init) random values, so the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_adapter_updates_followed(lora_engine, smollm2_dir, smollm2_model, prompts, tmp_path):
    policy = load_smollm2(smollm2_dir, lora_attn_modules=["q_proj", "v_proj"], lora_rank=8)
    with pytest.raises(ValueError, match="update_adapter"):
        lora_engine.update_weights(policy)

    versions = []
    for step in (1, 2):
        _randomize_lora(policy, seed=step)
        step_dir = save_checkpoint(
            tmp_path, step, model=policy, source_checkpoint_dir=smollm2_dir, adapter_only=True
        )
        lora_engine.update_adapter(step_dir)
        results = lora_engine.generate(prompts, num_samples=2, max_new_tokens=12, seed=9)
        assert max_logprob_diff(policy, prompts, results, 1.0) < LOGPROB_ATOL
        # Neither the base model nor the previous adapter explains these logprobs.
        for other in [smollm2_model, *versions]:
            assert max_logprob_diff(other, prompts, results, 1.0) > 50 * LOGPROB_ATOL
        versions.append(copy.deepcopy(policy))
