import dataclasses

import pytest
import torch
from conftest import completions_of
from torch import nn
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2

from packrl.rl.reference import Reference, reference_for

DIMS = dict(
    vocab_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=64,
    max_seq_len=64,
    rope_base=100_000,
    scale_factor=1,
)


def tiny_lora():
    torch.manual_seed(0)
    return lora_llama3_2(
        ["q_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        lora_rank=4,
        lora_alpha=8,
        **DIMS,
    )


def token_logprobs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S] tokens -> [B, S-1] logprobs of each next token."""
    logits = model(tokens[:, :-1]).float()
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def train_one_step(model, tokens, params, lr=0.5):
    opt = torch.optim.SGD(params, lr=lr)
    (-token_logprobs(model, tokens).mean()).backward()
    opt.step()
    opt.zero_grad()


class NoCopy(nn.Linear):
    def __deepcopy__(self, memo):
        raise AssertionError("beta == 0 must not copy the model")


def test_beta_zero_loads_no_reference():
    model = NoCopy(2, 2)
    assert reference_for(model, lora=False, beta=0.0, offload_to_cpu=True) is None
    assert reference_for(model, lora=True, beta=0.0, offload_to_cpu=False) is None
    with pytest.raises(AssertionError, match="must not copy"):
        reference_for(model, lora=False, beta=0.1)  # proves the guard above could fail


def test_lora_reference_is_the_base_model_after_training():
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    policy = tiny_lora()
    base = llama3_2(**DIMS)
    missing, unexpected = base.load_state_dict(
        {k: v for k, v in policy.state_dict().items() if "lora" not in k}, strict=True
    )
    ref = reference_for(policy, lora=True, beta=0.1, offload_to_cpu=False)
    assert ref.model is policy  # no copy

    lora_params = [p for n, p in policy.named_parameters() if "lora" in n]
    for n, p in policy.named_parameters():
        p.requires_grad_("lora" in n)
    policy.train()
    for _ in range(2):  # the first step only moves lora_b off zero
        train_one_step(policy, tokens, lora_params)

    with torch.no_grad():
        expected = token_logprobs(base, tokens)
        trained = token_logprobs(policy, tokens)
    got = ref.logprobs(lambda m: token_logprobs(m, tokens))
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (trained - expected).abs().max() > 1e-3  # the adapters did change the policy
    # adapters are back on and the mode is restored afterwards
    assert policy.training
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(policy, tokens), trained, rtol=0, atol=0)


def test_full_reference_is_a_frozen_snapshot():
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    policy = llama3_2(**DIMS)
    with torch.no_grad():
        before = token_logprobs(policy, tokens)
    ref = reference_for(policy, lora=False, beta=0.1, offload_to_cpu=True)
    assert ref.model is not policy and not ref.model.training
    assert all(not p.requires_grad for p in ref.model.parameters())
    # tied embeddings stay tied in the copy, and nothing shares storage with the policy
    assert ref.model.output.tied_module is ref.model.tok_embeddings
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in ref.model.parameters()}

    policy.train()
    train_one_step(policy, tokens, list(policy.parameters()), lr=0.1)
    got = ref.logprobs(lambda m: token_logprobs(m, tokens))
    torch.testing.assert_close(got, before, rtol=0, atol=0)
    with torch.no_grad():
        assert (token_logprobs(policy, tokens) - before).abs().max() > 1e-3


def test_bad_reference_settings_are_named():
    with pytest.raises(ValueError, match="offload_to_cpu"):
        Reference(tiny_lora(), lora=True, offload_to_cpu=True)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        reference_for(llama3_2(**DIMS), lora=True, beta=0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        reference_for(llama3_2(**DIMS), lora=False, beta=-1.0)


def test_packed_grpo_step_with_lora_reference():
    """Real pieces end to end: packed rows, packed logprobs, LoRA reference, GRPO loss.

    The reference scores the same packed batch and mask as the policy; it matches the policy
    before any training (LoRA B = 0), stays put after a step while the policy moves, and
    row micro-batches add up to the full-batch gradient.
    """
    from packrl.packed.attention import packed_block_mask, use_packed_attention
    from packrl.packed.logprobs import packed_logprobs
    from packrl.packed.packing import pack_groups
    from packrl.rl.loss import completion_loss_weights, grpo_loss
    from packrl.rollout.group import GroupRollout

    g = torch.Generator().manual_seed(3)
    policy = use_packed_attention(tiny_lora())
    for n, p in policy.named_parameters():
        p.requires_grad_("lora" in n)
    ref = reference_for(policy, lora=True, beta=0.1, offload_to_cpu=False)

    def ids(n):
        return torch.randint(0, 64, (n,), generator=g).tolist()

    completions = [[ids(n) for n in (3, 5, 2)], [ids(n) for n in (4, 1, 6)]]
    lengths = [len(c) for group in completions for c in group]
    weights = completion_loss_weights(lengths, "grpo", max_new_tokens=8)
    groups = [
        GroupRollout(
            prompt_ids=ids(4),
            completions=completions_of(comps, [[0.0] * len(c) for c in comps]),
            advantages=[1.0, -0.25, -0.5],
            loss_weights=weights[3 * i : 3 * i + 3],
        )
        for i, comps in enumerate(completions)
    ]
    batch = pack_groups(groups, row_len=16)
    assert batch.tokens.shape[0] >= 2  # several rows, so the micro-batch split below is real
    mask = packed_block_mask(batch.group_ids, batch.parent_ids)

    def ref_logprobs(b, m):
        return ref.logprobs(lambda model: packed_logprobs(model, b, mask=m)[0])

    before, _ = packed_logprobs(policy, batch, mask=mask)
    # on-policy data: the sampler's logprobs are the policy's own (ratio 1 in the first pass)
    batch = dataclasses.replace(batch, behaviour_logprobs=before.detach().clone())
    ref_before = ref_logprobs(batch, mask)
    torch.testing.assert_close(ref_before, before.detach(), rtol=0, atol=1e-6)

    def loss_and_grads(rows):
        policy.zero_grad()
        total, stats = 0.0, None
        for idx in rows:
            mb = batch.select_rows(idx)
            m = packed_block_mask(mb.group_ids, mb.parent_ids)
            logp, _ = packed_logprobs(policy, mb, mask=m)
            loss, s = grpo_loss(
                logp,
                mb.behaviour_logprobs,
                mb.advantages,
                mb.loss_weights,
                mb.trained,
                ref_logprobs(mb, m),
                epsilon_low=0.2,
                epsilon_high=0.28,
                beta=0.1,
            )
            loss.backward()
            total += loss.item()
            stats = s if stats is None else stats + s
        grads = [p.grad.clone() for p in policy.parameters() if p.requires_grad]
        return total, stats, grads

    R = batch.tokens.shape[0]
    full_loss, full_stats, full_grads = loss_and_grads([list(range(R))])
    split_loss, split_stats, split_grads = loss_and_grads([[r] for r in range(R)])
    assert full_stats.tokens.item() == sum(lengths)
    assert abs(full_loss) > 1e-3 and split_loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(split_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    lora_params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(lora_params, lr=0.05)
    for _ in range(3):
        loss_and_grads([list(range(R))])
        opt.step()
    after, _ = packed_logprobs(policy, batch, mask=mask)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(ref_logprobs(batch, mask), ref_before, rtol=0, atol=1e-6)
    _, stats, _ = loss_and_grads([list(range(R))])
    assert stats.means()["kl"] > 0
