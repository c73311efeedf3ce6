"""The GRPO loss: clipped surrogate with separate low/high epsilon and a k3 KL penalty.

The loss over a rollout batch is a plain weighted SUM over its trained tokens. Each token's
weight (``completion_loss_weights``) already holds the aggregation (per-sequence mean, per-token
mean, or a constant normaliser), so splitting the batch into micro-batches of any shape and
adding their losses (or gradients) gives exactly the full-batch result.
"""

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def completion_loss_weights(
    lengths: Sequence[int], loss_type: str, max_new_tokens: int
) -> list[float]:
    """Per-token loss weight for each completion of the whole rollout batch.

    ``lengths[i]`` is the number of trained tokens of completion i; N = len(lengths).
    - "grpo":    mean over each sequence, then over sequences: 1 / (N * lengths[i])
    - "dapo":    mean over all tokens of the batch:             1 / sum(lengths)
    - "dr_grpo": constant normaliser (Dr. GRPO):                1 / (N * max_new_tokens)
    A completion with no tokens gets weight 0 (it has nothing to weigh).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if not 0 <= n <= max_new_tokens:
            raise ValueError(f"lengths[{i}] = {n} is outside [0, max_new_tokens={max_new_tokens}]")
    num_seqs = len(lengths)
    if loss_type == "grpo":
        return [1.0 / (num_seqs * n) if n > 0 else 0.0 for n in lengths]
    if loss_type == "dapo":
        total = sum(lengths)
        return [1.0 / total if n > 0 else 0.0 for n in lengths]
    return [1.0 / (num_seqs * max_new_tokens) if n > 0 else 0.0 for n in lengths]


@dataclass
class LossStats:
    """Token sums and counts from ``grpo_loss``: add them over micro-batches (and ranks),
    then call ``means()``. All fields are detached 0-dim float tensors, so adding them
    never synchronises with the device.

    policy_loss and kl_loss are the weighted contributions to the loss itself (already
    aggregated); the other sums are unweighted, over trained tokens.
    """

    tokens: Tensor  # number of trained tokens
    clipped_low: Tensor  # tokens with ratio < 1 - eps_low and A < 0 (gradient cut)
    clipped_high: Tensor  # tokens with ratio > 1 + eps_high and A > 0 (gradient cut)
    kl_sum: Tensor  # sum of k3 KL to the reference (0 without a reference)
    ratio_sum: Tensor
    ratio_min: Tensor  # +inf when there are no tokens
    ratio_max: Tensor  # -inf when there are no tokens
    policy_loss: Tensor  # sum of weight * -surrogate
    kl_loss: Tensor  # sum of weight * beta * k3

    def __add__(self, other: "LossStats") -> "LossStats":
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "ratio_min":
                out[f.name] = torch.minimum(a, b.to(a.device))
            elif f.name == "ratio_max":
                out[f.name] = torch.maximum(a, b.to(a.device))
            else:
                out[f.name] = a + b.to(a.device)
        return LossStats(**out)

    def all_reduce(self) -> "LossStats":
        """Combine the stats of all ranks (sums, min, max); a no-op without a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        sums = [f.name for f in fields(self) if f.name not in ("ratio_min", "ratio_max")]
        packed = torch.stack([getattr(self, n) for n in sums])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        low, high = self.ratio_min.clone(), self.ratio_max.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return LossStats(
            **dict(zip(sums, packed.unbind(0), strict=True)), ratio_min=low, ratio_max=high
        )

    def means(self) -> dict[str, float]:
        """Per-token means and fractions, as Python floats for the metric logger."""
        n = max(float(self.tokens), 1.0)
        return {
            "tokens": float(self.tokens),
            "clip_frac_low": float(self.clipped_low) / n,
            "clip_frac_high": float(self.clipped_high) / n,
            "kl": float(self.kl_sum) / n,
            "ratio_mean": float(self.ratio_sum) / n if self.tokens > 0 else 1.0,
            "ratio_min": float(self.ratio_min) if self.tokens > 0 else 1.0,
            "ratio_max": float(self.ratio_max) if self.tokens > 0 else 1.0,
            "policy_loss": float(self.policy_loss),
            "kl_loss": float(self.kl_loss),
        }


def grpo_loss(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_weights: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
) -> tuple[Tensor, LossStats]:
    """Clipped-surrogate GRPO loss, a weighted sum over the trained tokens.

    All tensors have the same shape (e.g. [R, S] for a packed batch); ``mask`` (bool) marks
    the trained tokens, and values elsewhere are ignored (even inf/nan). Per token:
        ratio = exp(logprobs - behaviour_logprobs)
        surrogate = min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
        k3 = exp(ref - logprobs) - (ref - logprobs) - 1          (when beta > 0)
        loss_token = -surrogate + beta * k3
    loss = sum(loss_weights * loss_token over mask). Only ``logprobs`` carries gradient.
    """
    shape = logprobs.shape
    named = {
        "behaviour_logprobs": behaviour_logprobs,
        "advantages": advantages,
        "loss_weights": loss_weights,
        "mask": mask,
    }
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, t in named.items():
        if t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected that of logprobs {tuple(shape)}"
            )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if not (0 <= epsilon_low < 1 and epsilon_high >= 0):
        raise ValueError(
            f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low}, {epsilon_high}"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (set beta: 0 to train without a reference)")

    # Work in fp32, and zero the untrained positions before exp() so that garbage there can
    # never turn into inf * 0 = nan.
    logp = torch.where(mask, logprobs.float(), 0.0)
    old = torch.where(mask, behaviour_logprobs.float(), 0.0)
    adv = torch.where(mask, advantages.float(), 0.0)
    weights = torch.where(mask, loss_weights.float(), 0.0)

    ratio = torch.exp(logp - old)
    clipped_ratio = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    policy_loss = -(weights * surrogate).sum()

    if beta > 0:
        ref = torch.where(mask, ref_logprobs.float(), 0.0)
        log_ratio_ref = ref - logp
        k3 = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        kl_loss = beta * (weights * k3).sum()
        kl_sum = k3.detach()[mask].sum()
    else:
        kl_loss = torch.zeros((), device=logp.device)
        kl_sum = torch.zeros((), device=logp.device)

    loss = policy_loss + kl_loss

    r = ratio.detach()
    f32 = torch.float32
    inf = torch.tensor(float("inf"), device=r.device)
    stats = LossStats(
        tokens=mask.sum().to(f32),
        clipped_low=((r < 1.0 - epsilon_low) & (adv < 0) & mask).sum().to(f32),
        clipped_high=((r > 1.0 + epsilon_high) & (adv > 0) & mask).sum().to(f32),
        kl_sum=kl_sum,
        ratio_sum=r[mask].sum(),
        ratio_min=torch.where(mask, r, inf).amin() if r.numel() else inf,
        ratio_max=torch.where(mask, r, -inf).amax() if r.numel() else -inf,
        policy_loss=policy_loss.detach(),
        kl_loss=kl_loss.detach(),
    )
    return loss, stats
