"""GRPO variants, each pinned to values computed by hand (issue 13 part 2).

Layout: one packed row [1, S]; `seq` numbers the completion a token belongs to.
"""

import math

import pytest
import torch

from packrl.rl.advantages import assign_advantages
from packrl.rl.loss import GRPOLoss, grpo_loss
from packrl.rollout.base import Completion
from packrl.rollout.group import GroupRollout

EPS = dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.0)


def _tokens(ratios, adv, weights, seq=None):
    """Logprobs whose ratio to behaviour -1.0 is `ratios`; everything [1, n]."""
    r = torch.tensor([ratios], dtype=torch.float64).float()
    old = torch.full_like(r, -1.0)
    logp = (old + r.log()).requires_grad_()
    mask = torch.ones_like(r, dtype=torch.bool)
    seq_ids = torch.tensor([seq if seq is not None else [0] * len(ratios)])
    return logp, old, torch.tensor([adv]), torch.tensor([weights]), mask, seq_ids


def test_gspo_sequence_ratio_is_the_geometric_mean_with_its_own_clip():
    # sequence 0: token ratios 2.0 and 0.5 -> s = sqrt(2 * 0.5) = 1; sequence 1: one token, s = 1.21
    logp, old, adv, w, mask, seq = _tokens(
        [2.0, 0.5, 1.21], [1.0, 1.0, -1.0], [0.25, 0.25, 0.5], seq=[0, 0, 1]
    )
    loss, stats = grpo_loss(logp, old, adv, w, mask, importance_ratio="sequence",
                            seq_ids=seq, epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0)  # fmt: skip
    # seq 0: min(1 * 1, 1 * 1) = 1 on both tokens; seq 1: A < 0, s = 1.21 > 1 + 4e-4:
    # min(-1.21, -1.0004) = -1.21 (not clipped: the pessimistic side is the unclipped one)
    expected = -(0.25 * 1.0 + 0.25 * 1.0 + 0.5 * -1.21)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # d/dlogp_t of -w * s * A with s = exp(mean over the sequence): -sum_w * s * A / len
    torch.testing.assert_close(
        logp.grad, torch.tensor([[-0.5 * 1.0 / 2, -0.5 * 1.0 / 2, 0.5 * 1.21]]), rtol=1e-5, atol=0
    )
    assert stats.ratio_max.item() == pytest.approx(1.21, rel=1e-5)  # the sequence ratios


def test_gspo_clips_whole_sequences():
    # s = sqrt(2 * 2) = 2 > 1 + eps with A > 0: the whole sequence's gradient is cut
    logp, old, adv, w, mask, seq = _tokens([2.0, 2.0], [1.0, 1.0], [0.5, 0.5])
    loss, stats = grpo_loss(logp, old, adv, w, mask, importance_ratio="sequence",
                            seq_ids=seq, **EPS)  # fmt: skip
    assert loss.item() == pytest.approx(-1.2, rel=1e-6)  # clipped surrogate 1.2
    loss.backward()
    assert logp.grad.abs().max().item() == 0.0
    assert stats.clipped_high.item() == 2


def test_cispo_keeps_every_tokens_gradient_with_a_clipped_detached_weight():
    # ratios 0.5 (A<0), 1.5 (A>0), 1.0: PPO's clip would drop the first two tokens' gradients
    logp, old, adv, w, mask, _ = _tokens([0.5, 1.5, 1.0], [-1.0, 1.0, 2.0], [1.0, 1.0, 0.5])
    loss, stats = grpo_loss(logp, old, adv, w, mask, policy_loss="cispo", **EPS)
    # loss = -sum w * sg(clip(r, 0.8, 1.2)) * A * logp, with logp = -1 + log r
    logps = [-1 + math.log(0.5), -1 + math.log(1.5), -1.0]
    weights_is = [0.8, 1.2, 1.0]
    expected = -sum(wi * c * a * lp for wi, c, a, lp in
                    zip([1.0, 1.0, 0.5], weights_is, [-1.0, 1.0, 2.0], logps, strict=True))  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.8, -1.2, -1.0]]), rtol=1e-6, atol=0)
    assert stats.clipped_low.item() == 1 and stats.clipped_high.item() == 1


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_rollout_correction_weights(mode):
    # trainer's old logprobs vs the sampler's: w = exp(old - behaviour) = 0.5, 1.5, 3.0
    behaviour = torch.tensor([[-1.0, -1.0, -1.0]])
    old = behaviour + torch.tensor([[math.log(0.5), math.log(1.5), math.log(3.0)]])
    logp = old.clone().requires_grad_()  # first pass: policy == old, ratio 1
    adv, w = torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.ones_like(w, dtype=torch.bool)
    loss, stats = grpo_loss(logp, behaviour, adv, w, mask, old_logprobs=old,
                            rollout_correction=mode, rollout_correction_cap=2.0, **EPS)  # fmt: skip
    weights = [0.5, 1.5, 2.0] if mode == "truncate" else [1.0, 1.0, 0.0]
    assert loss.item() == pytest.approx(-sum(weights), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([weights]), rtol=1e-6, atol=0)
    m = stats.means()
    assert m["is_weight_mean"] == pytest.approx(5.0 / 3, rel=1e-6)  # before truncation
    assert m["is_weight_max"] == pytest.approx(3.0, rel=1e-6)
    assert m["is_truncated_frac"] == pytest.approx(1 / 3)


def test_rollout_correction_recovers_the_gradient_under_a_perturbed_sampler():
    """A one-token policy over 8 tokens; the sampler's distribution q is the policy with its
    logits perturbed (as a bf16/FP8 engine's would be, exaggerated). From 20,000 samples of q,
    the estimate of grad E_pi[r] with the correction is close to the exact gradient; without
    it, PPO's clip on the ratio pi/q cuts whole tokens' gradients and the estimate is biased."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(8, generator=g)
    r = torch.randn(8, generator=g)
    q_logits = theta + 0.6 * torch.randn(8, generator=g)
    exact = torch.func.grad(lambda t: (t.softmax(-1) * r).sum())(theta)

    n = 20_000
    y = torch.multinomial(q_logits.softmax(-1), n, replacement=True, generator=g)
    behaviour = q_logits.log_softmax(-1)[y][None]
    adv, w = r[y][None], torch.full((1, n), 1.0 / n)
    mask = torch.ones(1, n, dtype=torch.bool)

    def gradient(**kw) -> tuple[float, torch.Tensor]:
        t = theta.clone().requires_grad_()
        logp = t.log_softmax(-1)[y][None]
        loss, _ = grpo_loss(logp, behaviour, adv, w, mask, **EPS, **kw)
        loss.backward()
        return loss.item(), -t.grad

    loss_plain, plain = gradient()
    old = theta.log_softmax(-1)[y][None]
    loss_tis, tis = gradient(old_logprobs=old, rollout_correction="truncate",
                             rollout_correction_cap=10.0)  # fmt: skip
    err_plain = ((plain - exact).norm() / exact.norm()).item()
    err_tis = ((tis - exact).norm() / exact.norm()).item()
    print(f"relative gradient error: plain {err_plain:.3f}, corrected {err_tis:.3f}; "
          f"loss plain {loss_plain:.4f}, corrected {loss_tis:.4f}, "
          f"exact objective {-(theta.softmax(-1) * r).sum().item():.4f}")  # fmt: skip
    assert err_tis < 0.1 and err_plain > 2 * err_tis


def _group(reward, finished=(True, True), lengths=(2, 4)):
    comps = [Completion([1] * n, [0.0] * n, f) for n, f in zip(lengths, finished, strict=True)]
    return GroupRollout(prompt_ids=[0], completions=comps, reward=list(reward))


def test_mask_truncated_completions_zeroes_their_weight_but_counts_the_sequence():
    groups = [_group([1.0, 0.0], finished=(True, False)), _group([0.0, 1.0])]
    GRPOLoss(mask_truncated_completions=True).assign_loss_weights(groups, max_new_tokens=8)
    # grpo: 1 / (N * len) with N = 4 sequences; the truncated one gets 0
    assert groups[0].loss_weights == [1 / 8, 0.0] and groups[1].loss_weights == [1 / 8, 1 / 16]
    GRPOLoss(loss_type="dapo", mask_truncated_completions=True).assign_loss_weights(groups, 8)
    assert groups[0].loss_weights == [1 / 8, 0.0]  # 1 / (2 + 2 + 4) trained tokens


@pytest.mark.parametrize(
    "scale, expected",
    [
        ("group", [[1.0, -1.0], [1.0, -1.0]]),  # each group: (r - mean) / (std=0.5 or 1.5)
        # rewards 1, 0, 3, 0: batch mean 1, batch std sqrt((0 + 1 + 4 + 1) / 4) = sqrt(1.5)
        ("batch", [[0.5 / 1.5**0.5, -0.5 / 1.5**0.5], [1.5 / 1.5**0.5, -1.5 / 1.5**0.5]]),
        ("none", [[0.5, -0.5], [1.5, -1.5]]),
    ],
)
def test_advantage_scaling(scale, expected):
    groups = [_group([1.0, 0.0]), _group([3.0, 0.0])]
    assign_advantages(groups, scale)
    for grp, want in zip(groups, expected, strict=True):
        assert grp.advantages == pytest.approx(want, rel=1e-3)


def test_variant_settings_are_named():
    with pytest.raises(ValueError, match="importance_ratio must be one of"):
        GRPOLoss(importance_ratio="seq")
    with pytest.raises(ValueError, match="rollout_correction must be one of"):
        GRPOLoss(rollout_correction="clip")
    loss = GRPOLoss()
    loss.resolve_auto(logprobs_match_trainer=True)
    assert loss.rollout_correction is None and not loss.needs_old_logprobs
    loss = GRPOLoss()
    loss.resolve_auto(logprobs_match_trainer=False)
    assert loss.rollout_correction == "truncate" and loss.needs_old_logprobs
