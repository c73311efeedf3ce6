"""Packed attention: BlockMask == dense mask == brute-force rule; blockwise CPU attention
equals SDPA (values and gradients); torchtune integration; KV-cache sampling unchanged."""

import pytest
import torch
import torch.nn.functional as F
from conftest import completions_of
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask
from torchtune.models.llama3_2._component_builders import llama3_2

from packrl.packed.attention import (
    block_mask_nbytes,
    blockwise_attention,
    packed_attention_call,
    packed_block_mask,
    packed_dense_mask,
    packed_mask_mod,
    use_packed_attention,
)
from packrl.packed.packing import pack_groups
from packrl.rollout.group import GroupRollout

ATOL = 1e-5  # fp32: blockwise and dense attention differ only by summation order


def random_batch(seed: int, row_len: int, n_groups: int = 4, max_prompt: int = 40):
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=g))

    groups = []
    for _ in range(n_groups):
        P = randint(1, max_prompt)
        lens = [randint(1, min(60, row_len - P)) for _ in range(randint(1, 6))]
        groups.append(
            GroupRollout(
                prompt_ids=[randint(0, 99) for _ in range(P)],
                completions=completions_of(
                    [[randint(0, 99) for _ in range(n)] for n in lens], [[0.0] * n for n in lens]
                ),
                advantages=[1.0] * len(lens),
                loss_weights=[1.0] * len(lens),
            )
        )
    return pack_groups(groups, row_len)


def brute_force_mask(group_ids, parent_ids) -> torch.Tensor:
    R, S = group_ids.shape
    out = torch.zeros(R, S, S, dtype=torch.bool)
    for r in range(R):
        g, p = group_ids[r].tolist(), parent_ids[r].tolist()
        for q in range(S):
            for k in range(q + 1):
                out[r, q, k] = g[k] == g[q] or g[k] == p[q]
    return out


def block_mask_to_dense(bm) -> torch.Tensor:
    """Token-level mask a BlockMask encodes: full blocks True, partial blocks mask_mod."""
    R = bm.kv_num_blocks.shape[0]
    S = bm.seq_lengths[0]
    bq, bk = bm.BLOCK_SIZE
    out = torch.zeros(R, S, S, dtype=torch.bool)
    idx = torch.arange(S)
    for r in range(R):
        for i in range(bm.kv_num_blocks.shape[2]):
            qs = idx[i * bq : (i + 1) * bq]
            for j in bm.full_kv_indices[r, 0, i, : bm.full_kv_num_blocks[r, 0, i]].tolist():
                out[r, qs[:, None], idx[j * bk : (j + 1) * bk]] = True
            for j in bm.kv_indices[r, 0, i, : bm.kv_num_blocks[r, 0, i]].tolist():
                ks = idx[j * bk : (j + 1) * bk]
                out[r, qs[:, None], ks] = bm.mask_mod(torch.tensor(r), None, qs[:, None], ks)
    return out


@pytest.mark.parametrize("seed,row_len,block", [(0, 96, 16), (1, 150, 32), (2, 200, 128)])
def test_block_dense_and_brute_force_agree(seed, row_len, block):
    b = random_batch(seed, row_len)
    brute = brute_force_mask(b.group_ids, b.parent_ids)
    dense = packed_dense_mask(b.group_ids, b.parent_ids)
    bm = packed_block_mask(b.group_ids, b.parent_ids, block_size=block)
    assert torch.equal(dense, brute)
    assert torch.equal(block_mask_to_dense(bm), brute)
    # same block classification as torch's own (dense-materialising) builder
    ref = create_block_mask(
        packed_mask_mod(b.group_ids, b.parent_ids), b.num_rows, None, row_len, row_len, "cpu", block
    )
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(bm.to_dense(), ref.to_dense())
    assert dense.diagonal(dim1=1, dim2=2).all()  # nobody is fully masked: no NaN


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000), row_len=st.integers(40, 130), block=st.sampled_from([8, 16, 128])
)
def test_block_mask_property(seed, row_len, block):
    b = random_batch(seed, row_len, n_groups=3, max_prompt=20)
    dense = packed_dense_mask(b.group_ids, b.parent_ids)
    bm = packed_block_mask(b.group_ids, b.parent_ids, block_size=block)
    assert torch.equal(block_mask_to_dense(bm), dense)


def qkv(R, H, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(R, H, S, D, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("row_len,block", [(150, 16), (300, 128)])
def test_blockwise_attention_matches_dense_sdpa_with_grads(row_len, block):
    b = random_batch(3, row_len)
    # add an all-padding row: must stay finite
    gids = torch.cat([b.group_ids, torch.full((1, row_len), -1)])
    pids = torch.cat([b.parent_ids, torch.full((1, row_len), -1)])
    R, H, S, D = gids.shape[0], 4, row_len, 16
    bm = packed_block_mask(gids, pids, block_size=block)
    dense = packed_dense_mask(gids, pids)
    q, k, v = qkv(R, H, S, D)
    w = torch.randn(R, H, S, D)
    out = blockwise_attention(q, k, v, bm)
    (out * w).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    (ref * w).sum().backward()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    for g, t in zip(grads, (q, k, v), strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, t.grad, atol=ATOL, rtol=0)
    # without autograd too (reference-model scoring)
    with torch.no_grad():
        torch.testing.assert_close(blockwise_attention(q, k, v, bm), ref, atol=ATOL, rtol=0)


def test_packed_attention_call_dispatch():
    b = random_batch(4, 100)
    q, k, v = (t.detach() for t in qkv(b.num_rows, 2, 100, 16))
    bm = packed_block_mask(b.group_ids, b.parent_ids, block_size=32)
    dense = packed_dense_mask(b.group_ids, b.parent_ids)
    via_block = packed_attention_call(q, k, v, bm, 0.0, False)
    via_dense = packed_attention_call(q, k, v, dense, 0.0, False)  # torchtune's [b, s, s]
    torch.testing.assert_close(via_block, via_dense, atol=ATOL, rtol=0)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(packed_attention_call(q, k, v, None, 0.0, True), causal)
    with pytest.raises(ValueError, match="dropout"):
        packed_attention_call(q, k, v, bm, 0.1, False)


def test_mask_memory_grows_with_blocks_not_positions():
    sizes = {}
    for S in (512, 2048):
        ids = torch.arange(S).div(300, rounding_mode="floor")[None]  # segments of 300
        bm = packed_block_mask(ids, ids)
        sizes[S] = (block_mask_nbytes(bm), block_mask_nbytes(packed_dense_mask(ids, ids)))
    (b1, d1), (b4, d4) = sizes[512], sizes[2048]
    assert (d1, d4) == (512**2, 2048**2)  # one byte per (query, key)
    assert b4 < d4 / 200  # index tensors: ~ (S / 128)^2 int32 entries
    assert 10 < b4 / b1 < 17  # 4x the length -> ~16x the blocks


def tiny_model(seed=0):
    torch.manual_seed(seed)
    m = llama3_2(
        vocab_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=256,
        intermediate_dim=128,
        rope_base=10_000,
        scale_factor=1,
    )
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.1)
    return m.eval()


def test_stock_torchtune_on_cpu_cannot_take_a_block_mask():
    # torchtune 0.6.1 gates flex attention on CUDA: on CPU it hands the BlockMask to SDPA
    model = tiny_model()
    b = random_batch(5, 64, n_groups=2, max_prompt=10)
    bm = packed_block_mask(b.group_ids, b.parent_ids)
    with pytest.raises(Exception):  # noqa: B017 (whatever SDPA raises for a non-tensor mask)
        model(b.tokens, mask=bm, input_pos=b.positions)
    use_packed_attention(model)
    with torch.no_grad():
        out = model(b.tokens, mask=bm, input_pos=b.positions)
    assert torch.isfinite(out).all()


def test_kv_cache_generation_unchanged_by_use_packed_attention():
    prompt = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def greedy(model, steps=6):
        model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=32)
        causal = torch.tril(torch.ones(32, 32, dtype=torch.bool))
        pos = torch.arange(32)
        with torch.no_grad():
            logits = model(
                prompt, mask=causal[None, :12].expand(2, -1, -1), input_pos=pos[None, :12]
            )
            out, seen = [], [logits[:, -1]]
            for t in range(12, 12 + steps):
                nxt = seen[-1].argmax(-1, keepdim=True)
                out.append(nxt)
                logits = model(
                    nxt,
                    mask=causal[None, t : t + 1].expand(2, -1, -1),
                    input_pos=pos[None, t : t + 1].expand(2, -1),
                )
                seen.append(logits[:, -1])
        model.reset_caches()
        return torch.cat(out, 1), torch.stack(seen)

    model = tiny_model()
    ids_before, logits_before = greedy(model)
    use_packed_attention(model)
    model.caches_are_setup() and model.reset_caches()
    ids_after, logits_after = greedy(model)
    assert torch.equal(ids_before, ids_after)
    assert torch.equal(logits_before, logits_after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention kernels need CUDA here")
def test_flex_attention_on_cuda_matches_dense():
    b = random_batch(6, 256)
    q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(b.num_rows, 4, 256, 16))
    bm = packed_block_mask(b.group_ids.cuda(), b.parent_ids.cuda())
    dense = packed_dense_mask(b.group_ids, b.parent_ids).cuda()
    out = packed_attention_call(q, k, v, bm, 0.0, False)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
