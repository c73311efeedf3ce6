"""NativeSampler against plain full-forward references on a tiny random Llama, and SmolLM2.

Most tests run the eager decode step (``Eager``: no compile time); the compiled step is
checked against it token for token at the end of the file.
"""

import functools

import pytest
import torch
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.training import set_activation_checkpointing

from packrl.rollout import Completion, NativeSampler, native

Eager = functools.partial(NativeSampler, compile=False)

VOCAB = 128
PAD = 0
# Prompts of different lengths, so a batch of them is left-padded.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]
# fp32: cached decoding and a full forward differ only by summation order.
LOGPROB_ATOL = 1e-4

TINY = dict(
    vocab_size=VOCAB,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    max_seq_len=256,
    intermediate_dim=128,
    rope_base=10_000,
    scale_factor=1,
    tie_word_embeddings=False,
)


def _init(model: torch.nn.Module) -> torch.nn.Module:
    # Random tied embeddings make every token predict itself (greedy repeats the prompt's last
    # token), and the default untied output is nearly uniform (argmax near-ties). An untied
    # output scaled x8 gives peaked, varied distributions (top-1 p ~0.4, greedy sequences that
    # wander) with top-2 logit gaps > 0.1, far above fp32 noise.
    with torch.no_grad():
        model.output.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _init(llama3_2(**TINY)).eval()


def full_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """log softmax(logits / T) of each completion token, from one uncached forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0].float()
    logits = logits[len(prompt) - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(1)


def reference_greedy(model, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step: no cache, no padding."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] in stop:
                break
    return seq[len(prompt) :]


def test_logprobs_match_full_forward(tiny):
    # 4 prompts x 3 samples in chunks of 5: chunks split one prompt's samples across chunks.
    sampler = Eager(tiny, stop_token_ids=[1], pad_id=PAD, max_batch_size=5)
    out = sampler.generate(
        PROMPTS, num_samples=3, max_new_tokens=12, temperature=0.7, top_p=0.95, top_k=50, seed=3
    )
    assert [len(samples) for samples in out] == [3] * len(PROMPTS)
    for prompt, samples in zip(PROMPTS, out, strict=True):
        for c in samples:
            assert isinstance(c, Completion)
            assert len(c.token_ids) == len(c.logprobs) >= 1
            ref = full_logprobs(tiny, prompt, c.token_ids, temperature=0.7)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=LOGPROB_ATOL, rtol=0)


def test_greedy_matches_uncached_reference(tiny):
    sampler = Eager(tiny, stop_token_ids=[], pad_id=PAD)
    out = sampler.generate(PROMPTS, max_new_tokens=16, temperature=0.0)
    for prompt, (c,) in zip(PROMPTS, out, strict=True):
        assert c.token_ids == reference_greedy(tiny, prompt, 16, set())
        assert not c.finished
        ref = full_logprobs(tiny, prompt, c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=LOGPROB_ATOL, rtol=0)
    # The outputs must depend on the prompt, or this test proves little.
    assert len({tuple(c.token_ids) for (c,) in out}) == len(PROMPTS)


def test_left_padding_does_not_change_results(tiny):
    sampler = Eager(tiny, stop_token_ids=[], pad_id=PAD)
    short = [20, 21]
    (alone,) = sampler.generate([short], max_new_tokens=12, temperature=0.0)[0]
    batched = sampler.generate([PROMPTS[1], short, PROMPTS[3]], max_new_tokens=12, temperature=0)
    assert batched[1][0].token_ids == alone.token_ids
    torch.testing.assert_close(
        torch.tensor(batched[1][0].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
    )


def test_stop_tokens_end_sequences(tiny):
    free = Eager(tiny, stop_token_ids=[], pad_id=PAD)
    unstopped = [c.token_ids for (c,) in free.generate(PROMPTS, max_new_tokens=20, temperature=0)]
    # Stop on a token the first prompt produces mid-way; other prompts may or may not hit it.
    stop = unstopped[0][3]
    # A second stop id that never comes up checks that any of several ids stops a row.
    unused = next(t for t in range(VOCAB) if all(t not in full for full in unstopped))
    sampler = Eager(tiny, stop_token_ids=[unused, stop], pad_id=PAD, max_batch_size=4)
    out = sampler.generate(PROMPTS, max_new_tokens=20, temperature=0)
    hit_any = False
    for full, (c,) in zip(unstopped, out, strict=True):
        if stop in full:
            hit_any = True
            cut = full.index(stop) + 1
            assert c.token_ids == full[:cut] and c.finished
        else:
            assert c.token_ids == full and not c.finished
    assert hit_any and out[0][0].finished and not all(c.finished for (c,) in out)

    # When every row has stopped, decoding ends: one prefill, then one decode per later token.
    calls = []
    hook = tiny.norm.register_forward_hook(lambda *_: calls.append(1))
    try:
        (samples,) = sampler.generate(PROMPTS[:1], num_samples=3, max_new_tokens=20, temperature=0)
    finally:
        hook.remove()
    cut = unstopped[0].index(stop) + 1
    assert [c.token_ids for c in samples] == [unstopped[0][:cut]] * 3
    assert len(calls) == cut


def test_seed_determinism(tiny):
    sampler = Eager(tiny, stop_token_ids=[], pad_id=PAD, max_batch_size=8)
    kwargs = dict(num_samples=4, max_new_tokens=10, temperature=1.0)
    a = sampler.generate(PROMPTS, seed=11, **kwargs)
    b = sampler.generate(PROMPTS, seed=11, **kwargs)
    c = sampler.generate(PROMPTS, seed=12, **kwargs)
    assert a == b
    assert [[x.token_ids for x in s] for s in a] != [[x.token_ids for x in s] for s in c]
    # Samples of one prompt differ from each other (each row draws its own tokens).
    assert len({tuple(x.token_ids) for x in a[0]}) > 1
    # seed=None follows torch's global RNG.
    torch.manual_seed(5)
    d = sampler.generate(PROMPTS, **kwargs)
    torch.manual_seed(5)
    assert sampler.generate(PROMPTS, **kwargs) == d


def test_per_prompt_seeds_make_samples_independent_of_batching(tiny):
    """A prompt's samples depend only on its seed: not on the other prompts in the call, the
    batch size, or the order, which is what lets ranks split a step's prompts."""
    kwargs = dict(num_samples=3, max_new_tokens=10, temperature=1.0)
    seeds = [101, 102, 103, 104]
    whole = Eager(tiny, stop_token_ids=[], pad_id=PAD, max_batch_size=12)
    split = Eager(tiny, stop_token_ids=[], pad_id=PAD, max_batch_size=2)
    all_at_once = whole.generate(PROMPTS, seed=seeds, **kwargs)
    odd = split.generate(PROMPTS[1::2], seed=seeds[1::2], **kwargs)
    even = split.generate(PROMPTS[::2][::-1], seed=seeds[::2][::-1], **kwargs)[::-1]
    ids = lambda out: [[c.token_ids for c in group] for group in out]  # noqa: E731
    assert ids(all_at_once[1::2]) == ids(odd)
    assert ids(all_at_once[::2]) == ids(even)
    assert len({tuple(c.token_ids) for c in all_at_once[0]}) > 1
    with pytest.raises(ValueError, match="per-prompt seeds"):
        whole.generate(PROMPTS, seed=seeds[:2], **kwargs)


def test_sync_weights_copies_a_policy_into_the_sampling_model(tiny):
    import copy

    policy = copy.deepcopy(tiny)
    sampler = Eager(copy.deepcopy(tiny), stop_token_ids=[], pad_id=PAD)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kwargs = dict(num_samples=1, max_new_tokens=6, temperature=0)
    before = sampler.generate(PROMPTS, **kwargs)
    sampler.sync_weights(policy)
    assert sampler.model is not policy
    for a, b in zip(sampler.model.parameters(), policy.parameters(), strict=True):
        assert torch.equal(a, b)
    after = sampler.generate(PROMPTS, **kwargs)
    expect = Eager(policy, stop_token_ids=[], pad_id=PAD).generate(PROMPTS, **kwargs)
    assert after == expect and after != before


def test_bf16_decoding_keeps_a_synced_copy_and_flags_its_logprobs(tiny):
    import copy

    policy = copy.deepcopy(tiny)
    sampler = Eager(policy, stop_token_ids=[], pad_id=PAD, dtype="bf16")
    assert not sampler.logprobs_match_trainer  # so rollout correction "auto" turns on
    assert Eager(policy, stop_token_ids=[], pad_id=PAD, dtype="fp32").logprobs_match_trainer
    assert sampler.model is not policy
    dtypes = {n: p.dtype for n, p in sampler.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "norm" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "norm" in n} == {torch.float32}  # RMSNorm is fp32
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # the policy is untouched
    out = sampler.generate(PROMPTS, num_samples=3, max_new_tokens=12, temperature=0.7, seed=3)
    # Behaviour logprobs are the bf16 model's: near the fp32 policy's, not equal to them.
    diffs = []
    for prompt, samples in zip(PROMPTS, out, strict=True):
        for c in samples:
            ref = full_logprobs(policy, prompt, c.token_ids, temperature=0.7)
            diffs.append((torch.tensor(c.logprobs) - ref).abs())
    diffs = torch.cat(diffs)
    assert 0 < diffs.max() < 0.25 and diffs.mean() < 0.05, diffs
    # An update of the fp32 policy reaches the bf16 copy through sync_weights.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampler.sync_weights(policy)
    for a, b in zip(sampler.model.parameters(), policy.parameters(), strict=True):
        assert torch.equal(a, b.to(a.dtype))
    with pytest.raises(ValueError, match="dtype"):
        Eager(policy, stop_token_ids=[], pad_id=PAD, dtype="fp12")


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    sampler = Eager(tiny, stop_token_ids=[], pad_id=PAD)
    greedy = sampler.generate(PROMPTS, num_samples=2, max_new_tokens=10, temperature=0)
    top_k = sampler.generate(PROMPTS, num_samples=2, max_new_tokens=10, top_k=1, seed=0)
    top_p = sampler.generate(PROMPTS, num_samples=2, max_new_tokens=10, top_p=1e-6, seed=0)
    for g, k, p in zip(greedy, top_k, top_p, strict=True):
        assert [x.token_ids for x in g] == [x.token_ids for x in k] == [x.token_ids for x in p]
        # Logprobs are of the untruncated softmax(logits / 1), as in greedy.
        torch.testing.assert_close(
            torch.tensor([x.logprobs for x in k]), torch.tensor([x.logprobs for x in g])
        )


def reference_filter(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Top-k then top-p on one row of logits [V] by a full sort: the textbook version."""
    logits = logits.clone()
    if top_k is not None:
        logits[logits < logits.topk(top_k).values[-1]] = float("-inf")
    probs, order = logits.softmax(-1).sort(descending=True)
    drop = probs.cumsum(-1) - probs >= top_p
    logits[order[drop]] = float("-inf")
    return logits


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.5, None, 1.0), (1.5, 5, 1.0), (1.5, 20, 0.8), (6.0, None, 0.95)],
)
def test_first_token_distribution(temperature, top_k, top_p):
    """20k one-token samples of one prompt follow softmax(logits / T), truncated by top-k
    and top-p. The last case keeps more than 64 tokens: the top-p search must widen."""
    torch.manual_seed(1)
    model = _init(llama3_2(**TINY)).eval()
    prompt, n = [3, 4, 5], 20_000
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1] / temperature
    expected = reference_filter(logits, top_k, top_p).softmax(-1)
    if temperature == 6.0:
        assert int((expected > 0).sum()) > 64
    sampler = Eager(model, stop_token_ids=[], pad_id=PAD, max_batch_size=n)
    (samples,) = sampler.generate(
        [prompt],
        num_samples=n,
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=0,
    )
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in samples]), minlength=VOCAB)
    assert bool((expected[counts > 0] > 0).all()), "sampled a token the filters removed"
    total_variation = 0.5 * (counts / n - expected).abs().sum()
    # Sampling noise alone gives E[TV] = sum_i sqrt(2 p_i (1 - p_i) / (pi n)) / 2 (0.01-0.03).
    noise = 0.5 * (2 * expected * (1 - expected) / (torch.pi * n)).sqrt().sum()
    assert total_variation < 1.5 * noise, (total_variation, noise)


def test_training_unaffected_lora_and_checkpointing():
    """LoRA with dropout and activation checkpointing, in train mode, as the recipe has it."""
    torch.manual_seed(0)
    model = lora_llama3_2(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, lora_dropout=0.5, **TINY)
    _init(model)
    for name, p in model.named_parameters():
        if "lora_b" in name:  # non-zero adapters, so LoRA paths matter
            torch.nn.init.normal_(p, std=0.05)
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.train()
    tokens = torch.tensor([PROMPTS[1]])
    sampler = Eager(model, stop_token_ids=[], pad_id=PAD)
    out = sampler.generate(PROMPTS, num_samples=2, max_new_tokens=8, temperature=0.9, seed=0)

    assert model.training and all(m.training for m in model.modules())
    assert not model.caches_are_setup()
    # A training forward and backward works as before generate.
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora" in n)
    # Logprobs were taken with dropout off: they match an eval-mode forward.
    model.eval()
    for prompt, samples in zip(PROMPTS, out, strict=True):
        for c in samples:
            ref = full_logprobs(model, prompt, c.token_ids, temperature=0.9)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompts=[[1, 2], []]), "prompts[1]"),
        (dict(prompts=[[1, VOCAB]]), "prompts[0]"),
        (dict(prompts=[[1] * 250], max_new_tokens=10), "max_seq_len"),
        (dict(num_samples=0), "num_samples"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_arguments_name_the_field(tiny, kwargs, field):
    sampler = Eager(tiny, stop_token_ids=[1], pad_id=PAD)
    kwargs = {"prompts": [[1, 2]], "max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        sampler.generate(kwargs.pop("prompts"), **kwargs)


def test_bad_constructor_arguments(tiny):
    with pytest.raises(ValueError, match="stop_token_ids"):
        NativeSampler(tiny, stop_token_ids=[VOCAB], pad_id=PAD)
    with pytest.raises(ValueError, match="max_batch_size"):
        NativeSampler(tiny, stop_token_ids=[1], pad_id=PAD, max_batch_size=0)
    with pytest.raises(TypeError, match="model"):
        NativeSampler(torch.nn.Linear(2, 2), stop_token_ids=[1], pad_id=PAD)


def test_compiled_step_matches_eager_lora_checkpointed(monkeypatch):
    """The compiled decode step (torch.compile of the layer and of the head + sampling) gives
    the eager step's tokens, with logprobs to 1e-5, on the recipe's hardest model: LoRA with
    dropout under activation checkpointing. Rows stop at different steps, so the batch moves
    down its buckets (8 -> 4 -> 2); T = 6 with top-p 0.95 keeps more than the first 64
    candidates, so compiled steps hand some rows to the eager top-p widening. Dynamic shapes
    keep it to one graph per compiled part for every batch bucket and cache length."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = lora_llama3_2(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, lora_dropout=0.5, **TINY)
    _init(model)
    for name, p in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.05)
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.train()
    free = Eager(model, stop_token_ids=[], pad_id=PAD)
    unstopped = [c.token_ids for (c,) in free.generate(PROMPTS, max_new_tokens=16, temperature=0)]
    # A stop token the greedy rows meet at different steps makes the live batch shrink.
    stop = unstopped[0][2]
    kwargs = dict(num_samples=2, max_new_tokens=16, seed=7)
    settings = [dict(temperature=0.0), dict(temperature=6.0, top_p=0.95, top_k=100)]
    eager = Eager(model, stop_token_ids=[stop], pad_id=PAD, max_batch_size=8)
    compiled = NativeSampler(
        model, stop_token_ids=[stop], pad_id=PAD, max_batch_size=8, compile=True
    )

    widened = []
    wide = native._sample_wide
    monkeypatch.setattr(native, "_sample_wide", lambda *a, **k: widened.append(1) or wide(*a, **k))
    counters.clear()
    for setting in settings:
        want = eager.generate(PROMPTS, **kwargs, **setting)
        widened.clear()
        got = compiled.generate(PROMPTS, **kwargs, **setting)
        for w, g in zip(want, got, strict=True):
            assert [c.token_ids for c in g] == [c.token_ids for c in w]
            assert [c.finished for c in g] == [c.finished for c in w]
            torch.testing.assert_close(
                torch.tensor([lp for c in g for lp in c.logprobs]),
                torch.tensor([lp for c in w for lp in c.logprobs]),
                atol=1e-5,
                rtol=0,
            )
    assert len(widened) > 1  # the first token of the chunk, then rows that top-p widened
    finished = [c.finished for group in got for c in group]
    assert any(finished) and not all(finished)
    assert {shape[0] for shape in compiled.step_shapes} >= {8, 4}
    # A prompt long enough for the next cache-length bucket reuses the same graphs.
    compiled.generate([[3] * 120], max_new_tokens=16, temperature=0.0)
    assert {shape[1] for shape in compiled.step_shapes} == {128, 256}
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph for the layer, one for the head per sampling setting (greedy, sampled).
    assert counters["stats"]["unique_graphs"] == 1 + len(settings)
    assert compiled.compile_seconds > 0
    assert model.training and not model.caches_are_setup()


@pytest.mark.slow  # ~10 s quiet, minutes on a loaded machine
def test_smollm2_greedy_paris_and_batched_logprobs(smollm2_model, smollm2_tokenizer):
    """The real model: a right answer, and sampled logprobs that match a full forward."""
    tok = smollm2_tokenizer
    sampler = Eager(smollm2_model, stop_token_ids=tok.stop_token_ids, pad_id=tok.pad_id)
    france = tok.tokenize_messages([{"role": "user", "content": "What is the capital of France?"}])
    (answer,) = sampler.generate([france], max_new_tokens=24, temperature=0)[0]
    assert "Paris" in tok.decode(answer.token_ids)
    assert answer.finished and answer.token_ids[-1] in tok.stop_token_ids

    # Batched with a longer prompt (so France is left-padded) and sampled.
    longer = tok.tokenize_messages(
        [{"role": "user", "content": "Add 17 and 25, then explain each step of the sum."}]
    )
    assert len(longer) > len(france)
    out = sampler.generate(
        [france, longer], num_samples=2, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=0
    )
    for prompt, samples in zip([france, longer], out, strict=True):
        for c in samples:
            ref = full_logprobs(smollm2_model, prompt, c.token_ids, temperature=0.8)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=LOGPROB_ATOL, rtol=0)
    assert not smollm2_model.caches_are_setup()
