"""Packed forward == each prompt+completion run alone: logprobs, entropy and gradients.

Reference: each sequence run alone through the same fp32 decoder (plain ``model(x)``),
its final hidden states projected and log-softmaxed in float64.

Tolerances (fp32):
- tiny random models: logprobs and entropy 1e-5 absolute.
- SmolLM2: logprobs 3e-5 absolute. 1e-5 is below fp32's own noise for this model: its
  logits reach ~40 over 49152 tokens, and on this CPU the plain fp32 reference
  (``model(x).log_softmax``) is itself 1.8e-5 from the float64 projection, and the fp32
  model 2.6e-5 from a float64 copy. Packed and alone runs differ only in summation order
  (attention over gathered key blocks, projection matrix shapes); measured max 1.9e-5.
- gradients of a weighted sum of logprobs: per parameter tensor,
  max |packed - unpacked| <= 1e-5 * max |unpacked| (same terms, different order);
  5e-5 for SmolLM2's 30 layers (measured 1.6e-5 on one norm weight).
"""

import pytest
import torch
from conftest import completions_of
from hypothesis import given, settings
from hypothesis import strategies as st
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.training import set_activation_checkpointing

from packrl.packed.attention import packed_dense_mask, use_packed_attention
from packrl.packed.logprobs import packed_logprobs
from packrl.packed.packing import pack_groups
from packrl.rollout.group import GroupRollout

LOGPROB_ATOL = 1e-5
SMOLLM2_ATOL = 3e-5
SMOLLM2_GRAD_REL = 5e-5
GRAD_REL = 1e-5  # max |packed - unpacked| <= GRAD_REL * max |unpacked|, per parameter tensor


def tiny_model(seed=0, lora=False):
    torch.manual_seed(seed)
    arch = dict(
        vocab_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=512,
        intermediate_dim=128,
        rope_base=10_000,
        scale_factor=1,
    )
    if lora:
        m = lora_llama3_2(
            lora_attn_modules=["q_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            lora_rank=4,
            lora_alpha=8,
            **arch,
        )
    else:
        m = llama3_2(**arch)
    with torch.no_grad():  # weights of realistic scale: logprobs around -5, not -90
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.1)
    return use_packed_attention(m.eval())


def random_groups(seed, n_groups, max_prompt, max_completion, vocab=128, max_g=5):
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=g))

    groups = []
    for _ in range(n_groups):
        lens = [randint(1, max_completion) for _ in range(randint(1, max_g))]
        groups.append(
            GroupRollout(
                prompt_ids=[randint(0, vocab - 1) for _ in range(randint(1, max_prompt))],
                completions=completions_of(
                    [[randint(0, vocab - 1) for _ in range(n)] for n in lens],
                    [[0.0] * n for n in lens],
                ),
                advantages=[randint(-3, 3) / 2 for _ in lens],
                loss_weights=[1.0 / randint(1, 4) for _ in lens],
            )
        )
    return groups


def reference(model, groups, temperature=1.0):
    """Per completion (group-major): logprobs [n], entropy [n] and the hidden states [n, D]
    that predict its tokens, each sequence run alone.

    The decoder runs in fp32 on prompt+completion alone (plain ``model(x)``, causal); the
    final-norm hidden states are projected and log-softmaxed in float64. Projecting in
    fp32 instead gives logprobs 1.8e-5 off on SmolLM2 (a 49152-way log-softmax of logits
    up to ~40): that is the reference's own rounding, not a packing error. The packed
    run's hidden states equal the alone run's exactly on this CPU; what the tolerance
    covers is the packed path's fp32 projection (measured 8e-6 on SmolLM2).
    """
    out, captured = [], {}
    handle = model.norm.register_forward_hook(lambda mod, inp, h: captured.update(h=h))
    weight = model.tok_embeddings.weight.double()  # the models here tie the output projection
    try:
        for grp in groups:
            P = len(grp.prompt_ids)
            for c in (c.token_ids for c in grp.completions):
                model(torch.tensor([grp.prompt_ids + c]))
                h = captured["h"][0, P - 1 : P - 1 + len(c)].double()
                logp = (h @ weight.T / temperature).log_softmax(-1)
                lp = logp.gather(-1, torch.tensor(c)[:, None])[:, 0]
                ent = -(logp.exp() * logp).sum(-1)
                out.append((lp.float(), ent.float(), captured["h"][0, P - 1 : P - 1 + len(c)]))
    finally:
        handle.remove()
    return out


def assert_matches_reference(batch, logprobs, ref, entropy=None, atol=LOGPROB_ATOL):
    assert (logprobs[~batch.trained] == 0).all()
    for s, (lp, ent, _) in enumerate(ref):
        sel = batch.seq_ids == s
        torch.testing.assert_close(logprobs[sel], lp.detach(), atol=atol, rtol=0)
        if entropy is not None:
            torch.testing.assert_close(entropy[sel], ent.detach(), atol=atol, rtol=0)


@pytest.mark.parametrize("mask_kind", ["block", "dense"])
def test_tiny_logprob_parity(mask_kind):
    model = tiny_model()
    groups = random_groups(0, n_groups=4, max_prompt=50, max_completion=40)
    batch = pack_groups(groups, row_len=160)
    assert batch.num_rows < batch.stats.sequences  # really packed
    mask = None if mask_kind == "block" else packed_dense_mask(batch.group_ids, batch.parent_ids)
    with torch.no_grad():
        ref = reference(model, groups, temperature=0.7)
        lp, ent = packed_logprobs(model, batch, mask=mask, temperature=0.7, with_entropy=True)
        lp_small_chunks, _ = packed_logprobs(model, batch, mask=mask, temperature=0.7, chunk_size=7)
    assert_matches_reference(batch, lp, ref, ent)
    torch.testing.assert_close(lp_small_chunks, lp, atol=1e-6, rtol=0)


def weighted_loss(batch, logprobs):
    return (batch.advantages * batch.loss_weights * logprobs).sum()


def reference_loss(groups, ref):
    terms, s = [], 0
    for grp in groups:
        for j in range(grp.group_size):
            terms.append(grp.advantages[j] * grp.loss_weights[j] * ref[s][0].sum())
            s += 1
    return torch.stack(terms).sum()


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("mask_kind", ["block", "dense"])
def test_tiny_gradient_parity(mask_kind):
    model = tiny_model(1)
    groups = random_groups(1, n_groups=3, max_prompt=40, max_completion=30)
    batch = pack_groups(groups, row_len=128)
    mask = None if mask_kind == "block" else packed_dense_mask(batch.group_ids, batch.parent_ids)
    lp, _ = packed_logprobs(model, batch, mask=mask, chunk_size=16)
    packed = grads(model, weighted_loss(batch, lp))
    ref = reference(model, groups)
    unpacked = grads(model, reference_loss(groups, ref))
    assert_matches_reference(batch, lp.detach(), ref)
    for a, b in zip(packed, unpacked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=GRAD_REL * float(b.abs().max()))


def test_tiny_lora_with_activation_checkpointing():
    model = tiny_model(2, lora=True)
    set_trainable_params(model, get_adapter_params(model))
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.train()  # dropout is 0: train mode only switches checkpointing on
    groups = random_groups(2, n_groups=3, max_prompt=30, max_completion=30)
    batch = pack_groups(groups, row_len=100)
    lp, ent = packed_logprobs(model, batch, with_entropy=True)
    assert lp.requires_grad and ent.requires_grad
    packed = grads(model, weighted_loss(batch, lp) + 0.01 * ent.sum())
    ref = reference(model, groups)
    loss = reference_loss(groups, ref) + 0.01 * torch.stack([e.sum() for _, e, _ in ref]).sum()
    unpacked = grads(model, loss)
    assert len(packed) == len(get_adapter_params(model))
    for a, b in zip(packed, unpacked, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=GRAD_REL * float(b.abs().max()))


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_groups=st.integers(1, 4),
    max_prompt=st.integers(1, 40),
    max_completion=st.integers(1, 40),
    extra=st.integers(0, 60),
)
def test_tiny_parity_property(seed, n_groups, max_prompt, max_completion, extra):
    model = tiny_model()
    groups = random_groups(seed, n_groups, max_prompt, max_completion, max_g=6)
    longest = max(len(g.prompt_ids) + max(g.lengths) for g in groups)
    batch = pack_groups(groups, row_len=longest + extra)
    with torch.no_grad():
        lp, ent = packed_logprobs(model, batch, with_entropy=True)
        assert_matches_reference(batch, lp, reference(model, groups), ent)


def test_refuses_model_with_enabled_kv_caches():
    model = tiny_model()
    model.setup_caches(batch_size=1, dtype=torch.float32)
    batch = pack_groups(random_groups(3, 1, 5, 5), row_len=16)
    with pytest.raises(RuntimeError, match="KV caches are enabled"):
        packed_logprobs(model, batch)


# ---------------------------------------------------------------- SmolLM2 (real model)


@pytest.fixture(scope="module")
def smollm2_trainable(smollm2_dir):
    from packrl.models import load_smollm2

    return use_packed_attention(load_smollm2(smollm2_dir))


def smollm2_groups(tokenizer):
    prompts = ["What is 17 + 25? Answer with a number.", "Name a colour of the sky at noon."]
    answers = [
        ["17 + 25 = 42.", "42", "Let me think: 17 + 25 is 43."],
        ["The sky is blue at noon.", "Usually blue, sometimes grey."],
    ]
    groups = []
    for p, ans in zip(prompts, answers, strict=True):
        comps = [tokenizer.encode(a) + [2] for a in ans]  # <|im_end|> closes each completion
        groups.append(
            GroupRollout(
                prompt_ids=tokenizer.tokenize_messages([{"role": "user", "content": p}]),
                completions=completions_of(comps, [[0.0] * len(c) for c in comps]),
                advantages=[1.0, -0.5, 0.25, -1.0][: len(comps)],
                loss_weights=[1.0 / len(c) for c in comps],
            )
        )
    return groups


@pytest.mark.slow
def test_smollm2_logprob_and_gradient_parity(smollm2_trainable, smollm2_tokenizer):
    """SmolLM2 in fp32, logprobs within SMOLLM2_ATOL of the float64 projection of each
    sequence run alone (see the module docstring for why not 1e-5)."""
    model = smollm2_trainable
    groups = smollm2_groups(smollm2_tokenizer)
    longest = max(len(g.prompt_ids) + max(g.lengths) for g in groups)
    batch = pack_groups(groups, row_len=max(96, longest))
    assert batch.num_rows < batch.stats.sequences
    lp, _ = packed_logprobs(model, batch)
    packed = grads(model, weighted_loss(batch, lp))
    ref = reference(model, groups)
    assert_matches_reference(batch, lp.detach(), ref, atol=SMOLLM2_ATOL)
    unpacked = grads(model, reference_loss(groups, ref))
    for a, b in zip(packed, unpacked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=SMOLLM2_GRAD_REL * float(b.abs().max()))


def test_trimmed_rows_give_the_same_logprobs():
    """A partly filled row cut to a multiple of the block size computes the same logprobs
    (trailing padding is visible to no token)."""
    model = tiny_model()
    groups = random_groups(3, n_groups=2, max_prompt=20, max_completion=15)
    batch = pack_groups(groups, row_len=512)
    trimmed = batch.trimmed(128)
    used = int((batch.group_ids != -1).sum(dim=1).max())
    assert trimmed.row_len == -(-used // 128) * 128 < batch.row_len
    with torch.no_grad():
        full, _ = packed_logprobs(model, batch, temperature=0.7)
        cut, _ = packed_logprobs(model, trimmed, temperature=0.7)
    torch.testing.assert_close(cut, full[:, : trimmed.row_len], atol=1e-6, rtol=0)
    assert (full[:, trimmed.row_len :] == 0).all()
    assert batch.trimmed(512) is batch  # rounding up reaches row_len: nothing to cut
