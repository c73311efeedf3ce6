import math

import pytest
import torch

from packrl.rl.loss import LossStats, completion_loss_weights, grpo_loss

EPS = dict(epsilon_low=0.2, epsilon_high=0.28)


def _per_token_weights(lengths, weights, pad_to):
    """[N, pad_to] weights and mask, one completion per row."""
    w = torch.zeros(len(lengths), pad_to)
    mask = torch.zeros(len(lengths), pad_to, dtype=torch.bool)
    for i, (n, wi) in enumerate(zip(lengths, weights, strict=True)):
        w[i, :n] = wi
        mask[i, :n] = True
    return w, mask


def test_weights_hand_values():
    lengths, max_new = [2, 4], 8
    assert completion_loss_weights(lengths, "grpo", max_new) == [1 / 4, 1 / 8]
    assert completion_loss_weights(lengths, "dapo", max_new) == [1 / 6, 1 / 6]
    assert completion_loss_weights(lengths, "dr_grpo", max_new) == [1 / 16, 1 / 16]
    assert completion_loss_weights([0, 3], "grpo", 4) == [0.0, 1 / 6]


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (2.0 + 3.0) / 2),  # mean of the per-sequence means
        ("dapo", 16.0 / 6),  # mean over all 6 tokens
        ("dr_grpo", 16.0 / (2 * 8)),  # sum / (N * max_new_tokens)
    ],
)
def test_aggregation_through_the_loss(loss_type, expected):
    # ratio == 1 everywhere, so each token's loss is -A: pick A = -(the per-token value).
    values = torch.tensor([[1.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0, 6.0]])
    lengths = [2, 4]
    w, mask = _per_token_weights(lengths, completion_loss_weights(lengths, loss_type, 8), 4)
    logp = torch.full((2, 4), -1.0)
    loss, stats = grpo_loss(logp, logp.clone(), -values, w, mask, beta=0.0, **EPS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.tokens.item() == 6


def test_weights_bad_input():
    with pytest.raises(ValueError, match="grpo, dapo, dr_grpo"):
        completion_loss_weights([1], "ppo", 4)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 5"):
        completion_loss_weights([1, 5], "dr_grpo", 4)


def _clip_case():
    # tokens: (ratio, A, weight); the last column is not trained and holds garbage.
    ratios = torch.tensor([[0.5, 0.5, 1.5, 1.5, 1.0, 1.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0, 2.0, float("nan")]])
    w = torch.tensor([[1.0, 2.0, 1.0, 0.5, 1.0, 7.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    old = torch.full((1, 6), -2.0)
    old[0, 5] = float("-inf")
    logp = (old + ratios.log()).clone()
    logp[0, 5] = 0.0
    return logp.requires_grad_(), old, adv, w, mask


def test_clip_regions_loss_grad_and_stats():
    logp, old, adv, w, mask = _clip_case()
    loss, stats = grpo_loss(logp, old, adv, w, mask, beta=0.0, **EPS)
    # surrogates: min(-.5, -.8)=-.8 (clipped low), .5, min(1.5, 1.28)=1.28 (clipped high),
    # min(-1.5, -1.28)=-1.5, 2.0
    expected = -(1 * -0.8 + 2 * 0.5 + 1 * 1.28 + 0.5 * -1.5 + 1 * 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d(-w * r * A)/dlogp = -w * r * A where unclipped, 0 where clipped or untrained
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.0, 0.0, 0.75, -2.0, 0.0]]))
    m = stats.means()
    assert stats.tokens.item() == 5
    assert stats.clipped_low.item() == 1 and stats.clipped_high.item() == 1
    assert m["clip_frac_low"] == pytest.approx(0.2) and m["clip_frac_high"] == pytest.approx(0.2)
    assert m["ratio_mean"] == pytest.approx(5.0 / 5)
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["kl"] == 0.0 and m["kl_loss"] == 0.0
    assert m["policy_loss"] == pytest.approx(expected, rel=1e-6)


def test_k3_kl_values_and_grad():
    d = torch.tensor([[math.log(2.0), -math.log(2.0), 0.0]])  # ref - logp
    logp = torch.full((1, 3), -1.0, requires_grad=True)
    ref = logp.detach() + d
    zeros = torch.zeros(1, 3)
    w = torch.tensor([[1.0, 2.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    beta = 0.1
    # A = 0: only the KL term is left
    loss, stats = grpo_loss(logp, logp.detach(), zeros, w, mask, ref, beta=beta, **EPS)
    k3 = [2.0 - math.log(2.0) - 1.0, 0.5 + math.log(2.0) - 1.0, 0.0]
    assert stats.kl_sum.item() == pytest.approx(sum(k3), rel=1e-6)
    assert stats.means()["kl"] == pytest.approx(sum(k3) / 3, rel=1e-6)
    assert loss.item() == pytest.approx(beta * (k3[0] + 2 * k3[1]), rel=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp)
    expected = beta * w * (1.0 - torch.exp(d))
    torch.testing.assert_close(logp.grad, expected)


def test_beta_without_reference_is_an_error_and_beta_zero_ignores_it():
    logp, old, adv, w, mask = _clip_case()
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        grpo_loss(logp, old, adv, w, mask, beta=0.04, **EPS)
    with_ref, _ = grpo_loss(logp, old, adv, w, mask, logp.detach() + 1.0, beta=0.0, **EPS)
    without, _ = grpo_loss(logp, old, adv, w, mask, beta=0.0, **EPS)
    assert with_ref.item() == without.item()


def test_shape_and_mask_errors_name_the_field():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(x, x, torch.zeros(2, 4), x, m, beta=0.0, **EPS)
    with pytest.raises(ValueError, match="mask must be a bool"):
        grpo_loss(x, x, x, x, m.float(), beta=0.0, **EPS)


def test_micro_batches_add_up_to_the_full_batch():
    g = torch.Generator().manual_seed(0)
    shape = (3, 16)
    base = torch.randn(shape, generator=g) * 0.3 - 2.0
    old = base + torch.randn(shape, generator=g) * 0.3  # ratios spread over both clip edges
    ref = base + torch.randn(shape, generator=g) * 0.2
    adv = torch.randn(shape, generator=g)
    w = torch.rand(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.7
    kw = dict(beta=0.05, **EPS)

    full_logp = base.clone().requires_grad_()
    full, full_stats = grpo_loss(full_logp, old, adv, w, mask, ref, **kw)
    full.backward()

    # split the trained tokens at random into two micro-batches
    part = torch.rand(shape, generator=g) < 0.5
    split_logp = base.clone().requires_grad_()
    total, stats = torch.zeros(()), None
    for sel in (mask & part, mask & ~part):
        loss, s = grpo_loss(split_logp, old, adv, w, sel, ref, **kw)
        loss.backward()
        total = total + loss.detach()
        stats = s if stats is None else stats + s

    assert full_stats.clipped_low > 0 and full_stats.clipped_high > 0
    torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split_logp.grad, full_logp.grad, rtol=1e-6, atol=1e-8)
    for key, value in full_stats.means().items():
        assert stats.means()[key] == pytest.approx(value, rel=1e-5), key


def test_stats_of_an_empty_micro_batch_add_neutrally():
    logp, old, adv, w, mask = _clip_case()
    _, s = grpo_loss(logp, old, adv, w, mask, beta=0.0, **EPS)
    _, empty = grpo_loss(logp, old, adv, w, torch.zeros_like(mask), beta=0.0, **EPS)
    assert empty.means()["ratio_mean"] == 1.0
    both: LossStats = empty + s
    assert both.means() == s.means()


def _all_reduce_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    logp = torch.randn(2, 8, generator=g) * 0.3
    mask = torch.rand(2, 8, generator=g) < 0.8
    _, stats = grpo_loss(
        logp,
        torch.zeros(2, 8),
        torch.randn(2, 8, generator=g),
        torch.ones(2, 8),
        mask,
        beta=0.0,
        **EPS,
    )
    results[rank] = (stats, stats.all_reduce())
    dist.destroy_process_group()


def test_stats_all_reduce_across_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers need no fresh interpreter (spawn would re-import torch twice)
    ctx = mp.get_context("fork")
    results = ctx.Manager().dict()
    mp.start_processes(
        _all_reduce_worker, args=(str(tmp_path / "init"), results), nprocs=2, start_method="fork"
    )
    (local0, reduced0), (local1, reduced1) = results[0], results[1]
    expected = (local0 + local1).means()
    assert reduced0.means() == pytest.approx(expected) and reduced1.means() == pytest.approx(
        expected
    )
    assert expected["ratio_min"] == min(local0.means()["ratio_min"], local1.means()["ratio_min"])
    assert expected["tokens"] == local0.means()["tokens"] + local1.means()["tokens"]
    # single process, no group: a no-op
    assert LossStats.all_reduce(local0) is local0
