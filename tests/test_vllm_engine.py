"""VLLMSampler (in-process vLLM) against the trainer's own forward pass, on SmolLM2.

The tests marked ``vllm`` skip when vLLM is not installed (``./setup.sh --vllm`` installs it).
Each engine is built once per module: starting one takes 20-60 s on 2 CPU cores. The tests of
what happens without vLLM run everywhere (vLLM is hidden from the import system).
"""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune.models.llama3_2 import llama3_2

from packrl.checkpointing import save_checkpoint
from packrl.models import load_smollm2
from packrl.rollout.native import NativeSampler
from packrl.rollout.vllm_engine import NATIVE_COMPONENT, VLLMSampler, vllm_sampler
from packrl.training.config_schema import ConfigError, validate_config

# Both sides run SmolLM2 in fp32; they differ in kernels and summation order only. Measured
# max |diff| on this machine: about 1e-5 (see docs/vllm.md), so 2e-3 leaves room for other
# CPUs while staying far below the effect of every weight change below (> 0.1).
LOGPROB_ATOL = 2e-3
STOP = [2]  # <|im_end|>
MAX_MODEL_LEN = 256
QUESTIONS = ["What is 17 + 25?", "Name a colour of the sky."]
NEEDS_VLLM = "vLLM is not installed (./setup.sh --vllm installs the CPU build)"
# The configs' LoRA: every attention projection and the MLP (rank 12: vLLM serves it as 16).
LORA = dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True)
VLLM_CONFIGS = [
    "smollm2_135m_arithmetic_full_cpu_vllm.yaml",
    "smollm2_135m_arithmetic_lora_cpu_vllm.yaml",
]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "tune_configs"


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
def engine(smollm2_dir, smollm2_model):
    pytest.importorskip("vllm", reason=NEEDS_VLLM)
    torch.manual_seed(1234)
    STARTUP["rng_before"] = torch.get_rng_state()
    sampler = VLLMSampler(
        smollm2_model,
        stop_token_ids=STOP,
        pad_id=0,
        checkpoint_dir=smollm2_dir,
        max_model_len=MAX_MODEL_LEN,
        seed=0,
    )
    STARTUP["rng_after"] = torch.get_rng_state()
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def lora_policy(smollm2_dir):
    return load_smollm2(smollm2_dir, **LORA, lora_rank=12, lora_alpha=24)


@pytest.fixture(scope="module")
def lora_engine(smollm2_dir, lora_policy):
    pytest.importorskip("vllm", reason=NEEDS_VLLM)
    sampler = VLLMSampler(
        lora_policy, stop_token_ids=STOP, checkpoint_dir=smollm2_dir, max_model_len=MAX_MODEL_LEN
    )
    yield sampler
    sampler.close()


# ----------------------------------------------------------------------------- without vLLM


@pytest.fixture
def no_vllm(monkeypatch):
    """Hides vLLM: `import vllm` raises ImportError, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "vllm", None)


@pytest.fixture(scope="module")
def tiny_policy():
    torch.manual_seed(0)
    return llama3_2(
        vocab_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=64,
        intermediate_dim=128,
    ).eval()


def _args(smollm2_dir):
    return dict(stop_token_ids=STOP, pad_id=0, checkpoint_dir=smollm2_dir, max_model_len=64)


def test_missing_vllm_says_how_to_install(no_vllm, tiny_policy, smollm2_dir):
    """The error names the install command and the native sampler's config component."""
    for build in (VLLMSampler, vllm_sampler):
        with pytest.raises(ImportError, match=r"setup\.sh --vllm") as err:
            build(tiny_policy, **_args(smollm2_dir))
        assert f"sampler._component_: {NATIVE_COMPONENT}" in str(err.value)
        assert "if_unavailable: native" in str(err.value)


def test_missing_vllm_falls_back_to_native_when_asked(no_vllm, tiny_policy, smollm2_dir):
    with pytest.warns(UserWarning, match="falls back to packrl.rollout.native.NativeSampler"):
        sampler = vllm_sampler(tiny_policy, if_unavailable="native", **_args(smollm2_dir))
    assert isinstance(sampler, NativeSampler) and sampler.model is tiny_policy
    assert sampler.stop_token_ids == STOP and sampler.pad_id == 0
    (completions,) = sampler.generate([[5, 6, 7]], num_samples=2, max_new_tokens=4, seed=0)
    assert [len(c.token_ids) for c in completions] == [4, 4] or any(c.finished for c in completions)


def test_builder_checks_its_arguments_without_vllm(no_vllm, tiny_policy, smollm2_dir):
    with pytest.raises(ValueError, match="if_unavailable"):
        vllm_sampler(tiny_policy, if_unavailable="skip", **_args(smollm2_dir))
    # A typo fails here too, not only on machines that have vLLM.
    with pytest.raises(TypeError, match="max_model_length"):
        vllm_sampler(
            tiny_policy, if_unavailable="native", **_args(smollm2_dir), max_model_length=64
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="pad_id"):
            vllm_sampler(
                tiny_policy, if_unavailable="native", **{**_args(smollm2_dir), "pad_id": None}
            )


@pytest.mark.parametrize("path", VLLM_CONFIGS)
def test_vllm_configs_validate_and_name_a_bad_sampler_key(path):
    """The vLLM configs pass the recipe's config check (vLLM installed or not), and a
    misspelt engine argument is named, since the builder shows VLLMSampler's signature."""
    cfg = OmegaConf.load(CONFIG_DIR / path)
    assert cfg.sampler._component_ == "packrl.rollout.vllm_engine.vllm_sampler"
    validate_config(cfg)
    cfg.sampler.max_model_length = 512
    with pytest.raises(
        ConfigError, match=r"sampler\.max_model_length.*did you mean 'sampler\.max_model_len'"
    ):
        validate_config(cfg)


# ----------------------------------------------------------------------------- with vLLM


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
    # Per-prompt seeds: a prompt's samples do not depend on the other prompts of the call.
    both = engine.generate(prompts, num_samples=2, max_new_tokens=8, seed=[11, 22])
    alone = engine.generate(prompts[1:], num_samples=2, max_new_tokens=8, seed=[22])
    assert [c.token_ids for c in both[1]] == [c.token_ids for c in alone[0]]


@pytest.mark.vllm
@pytest.mark.slow
def test_bad_arguments_name_the_field(engine, prompts):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompts, max_new_tokens=8, top_p=0.9)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(prompts, max_new_tokens=MAX_MODEL_LEN)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate([prompts[0], []], max_new_tokens=8)


def _one_rank_fsdp(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """`model` sharded with FSDP2 over a one-process gloo group: its parameters become
    DTensors, as under torchrun (in-process vLLM may already have made the group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@pytest.mark.vllm
@pytest.mark.slow
def test_full_weight_sync_followed(engine, smollm2_model, prompts, tmp_path, capfd):
    """Perturb every weight, the tied embedding included, sync, and check vLLM follows; then
    sync the original weights back from an FSDP2-sharded copy (DTensor parameters). The
    sync logs nothing about the rotary embedding, which has no weights to load."""
    new = copy.deepcopy(smollm2_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.std())

    def check(model, other):
        results = engine.generate(prompts, num_samples=1, max_new_tokens=12, seed=5)
        assert max_logprob_diff(model, prompts, results, 1.0) < LOGPROB_ATOL
        # The weights pushed make a difference far above the tolerance.
        assert max_logprob_diff(other, prompts, results, 1.0) > 50 * LOGPROB_ATOL

    check(smollm2_model, new)  # also warms the prefix cache with the old weights' KV
    capfd.readouterr()
    engine.sync_weights(new)
    assert "RotaryEmbedding: Failed to load weights" not in "".join(capfd.readouterr())
    check(new, smollm2_model)
    sharded = _one_rank_fsdp(copy.deepcopy(smollm2_model), tmp_path)
    assert type(sharded.tok_embeddings.weight).__name__ == "DTensor"
    engine.sync_weights(sharded)  # also puts the module's engine back as it was
    check(smollm2_model, new)


def _randomize_lora(model, seed: int) -> None:
    """Gives the LoRA B matrices (zero at init) random values, so the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_sync_followed(
    lora_engine, lora_policy, smollm2_dir, smollm2_model, prompts, tmp_path
):
    """Two adapter versions synced in turn: each matches the trainer's LoRA model and neither
    the base model nor the previous version; a saved adapter checkpoint serves the same."""
    lora_config = lora_engine.llm.llm_engine.vllm_config.lora_config
    assert lora_config.max_lora_rank == 16  # the policy's rank 12, rounded up to a vLLM rank
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lora_engine.sync_weights(smollm2_model)

    def logprobs_follow(model, others):
        results = lora_engine.generate(prompts, num_samples=1, max_new_tokens=12, seed=9)
        assert max_logprob_diff(model, prompts, results, 1.0) < LOGPROB_ATOL
        for other in others:
            assert max_logprob_diff(other, prompts, results, 1.0) > 50 * LOGPROB_ATOL

    versions = []
    for step in (1, 2):
        _randomize_lora(lora_policy, seed=step)
        lora_engine.sync_weights(lora_policy)
        logprobs_follow(lora_policy, [smollm2_model, *versions])
        versions.append(copy.deepcopy(lora_policy))
    assert len(list(Path(lora_engine._adapter_tmp.name).iterdir())) == 1  # older ones deleted

    step_dir = save_checkpoint(
        tmp_path, 1, model=versions[0], source_checkpoint_dir=smollm2_dir, adapter_only=True
    )
    lora_engine.update_adapter(step_dir)
    logprobs_follow(versions[0], [versions[1]])
