"""The GRPO loss: clipped surrogate with separate low/high epsilon and a k3 KL penalty.

The loss over a rollout batch is a plain weighted SUM over its trained tokens. Each token's
weight (``completion_loss_weights``) already holds the aggregation (per-sequence mean, per-token
mean, or a constant normaliser), so splitting the batch into micro-batches of any shape and
adding their losses (or gradients) gives exactly the full-batch result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from packrl.packed.packing import PackedBatch
    from packrl.rollout.group import GroupRollout

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
    clipped_low: Tensor  # tokens whose ratio was clipped below (gradient cut, or CISPO weight)
    clipped_high: Tensor  # tokens whose ratio was clipped above
    kl_sum: Tensor  # sum of k3 KL to the reference (0 without a reference)
    ratio_sum: Tensor
    ratio_min: Tensor  # +inf when there are no tokens
    ratio_max: Tensor  # -inf when there are no tokens
    policy_loss: Tensor  # sum of weight * policy term
    kl_loss: Tensor  # sum of weight * beta * k3
    is_weight_sum: Tensor  # rollout correction weights (1 per token when it is off)
    is_weight_max: Tensor  # largest weight before truncation; -inf when there are no tokens
    is_truncated: Tensor  # tokens whose weight exceeded the cap (truncated or masked)

    _MIN = ("ratio_min",)
    _MAX = ("ratio_max", "is_weight_max")

    def __add__(self, other: LossStats) -> LossStats:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name).to(getattr(self, f.name).device)
            if f.name in self._MIN:
                out[f.name] = torch.minimum(a, b)
            elif f.name in self._MAX:
                out[f.name] = torch.maximum(a, b)
            else:
                out[f.name] = a + b
        return LossStats(**out)

    def all_reduce(self) -> LossStats:
        """Combine the stats of all ranks (sums, min, max); a no-op without a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        out = {}
        for names, op in (
            ([f.name for f in fields(self) if f.name not in self._MIN + self._MAX], "SUM"),
            (list(self._MIN), "MIN"),
            (list(self._MAX), "MAX"),
        ):
            packed = torch.stack([getattr(self, n) for n in names])
            dist.all_reduce(packed, op=getattr(dist.ReduceOp, op))
            out.update(zip(names, packed.unbind(0), strict=True))
        return LossStats(**out)

    def means(self) -> dict[str, float]:
        """Per-token means and fractions, as Python floats for the metric logger."""
        n = max(float(self.tokens), 1.0)
        some = self.tokens > 0
        return {
            "tokens": float(self.tokens),
            "clip_frac_low": float(self.clipped_low) / n,
            "clip_frac_high": float(self.clipped_high) / n,
            "kl": float(self.kl_sum) / n,
            "ratio_mean": float(self.ratio_sum) / n if some else 1.0,
            "ratio_min": float(self.ratio_min) if some else 1.0,
            "ratio_max": float(self.ratio_max) if some else 1.0,
            "policy_loss": float(self.policy_loss),
            "kl_loss": float(self.kl_loss),
            "is_weight_mean": float(self.is_weight_sum) / n if some else 1.0,
            "is_weight_max": float(self.is_weight_max) if some else 1.0,
            "is_truncated_frac": float(self.is_truncated) / n,
        }


IMPORTANCE_RATIOS = ("token", "sequence")
POLICY_LOSSES = ("clip", "cispo")
ROLLOUT_CORRECTIONS = ("truncate", "mask")


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
    importance_ratio: str = "token",
    seq_ids: Tensor | None = None,
    policy_loss: str = "clip",
    old_logprobs: Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_correction_cap: float = 2.0,
) -> tuple[Tensor, LossStats]:
    """The GRPO loss and its variants, a weighted sum over the trained tokens.

    All tensors have the same shape (e.g. [R, S] for a packed batch); ``mask`` (bool) marks
    the trained tokens, and values elsewhere are ignored (even inf/nan). Per token, with
    ``old`` the logprobs the ratio is taken against:

        log_ratio = logprobs - old
            ("sequence": GSPO, Zheng et al. 2025: the mean of log_ratio over the token's
            completion, ``seq_ids`` naming completions, so ratio is the geometric mean of
            its token ratios)
        ratio = exp(log_ratio),   c = clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
        policy term:
            "clip"  (PPO/GRPO):  -min(ratio * A, c * A)
            "cispo" (MiniMax-M1, 2025): -sg(c) * A * logprobs   (no token's gradient dropped)
        k3 = exp(ref - logprobs) - (ref - logprobs) - 1          (when beta > 0)
        loss_token = w_is * policy term + beta * k3

    Rollout correction (``rollout_correction``; the engine that sampled is not the trainer:
    vLLM, bf16/FP8 rollouts): ``old = old_logprobs`` (the trainer's logprobs before the
    update) instead of ``behaviour_logprobs`` (the sampler's), and the policy term is weighted
    by w_is = exp(old_logprobs - behaviour_logprobs), detached (truncated importance
    sampling, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"):
        "truncate": w_is = min(w_is, cap);
        "mask":     tokens with w_is > cap are dropped from the policy term (w_is = 1 else).
    Without it, old = behaviour_logprobs and w_is = 1.

    loss = sum(loss_weights * loss_token over mask). Only ``logprobs`` carries gradient.

    Raises:
        ValueError: shapes differ, a setting is out of range, or an input a setting needs
            (ref_logprobs, seq_ids, old_logprobs) is missing.
    """
    shape = logprobs.shape
    named = {
        "behaviour_logprobs": behaviour_logprobs,
        "advantages": advantages,
        "loss_weights": loss_weights,
        "mask": mask,
        "ref_logprobs": ref_logprobs,
        "seq_ids": seq_ids,
        "old_logprobs": old_logprobs,
    }
    for name, t in named.items():
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected that of logprobs {tuple(shape)}"
            )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    _check_settings(epsilon_low, epsilon_high, beta, importance_ratio, policy_loss,
                    rollout_correction, rollout_correction_cap)  # fmt: skip
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (set beta: 0 to train without a reference)")
    if importance_ratio == "sequence" and seq_ids is None:
        raise ValueError("importance_ratio='sequence' needs seq_ids (which completion a token is)")
    if rollout_correction is not None and old_logprobs is None:
        raise ValueError("rollout_correction needs old_logprobs (the trainer's, before the update)")

    # Work in fp32, and zero the untrained positions before exp() so that garbage there can
    # never turn into inf * 0 = nan.
    f32 = torch.float32
    logp = torch.where(mask, logprobs.float(), 0.0)
    behaviour = torch.where(mask, behaviour_logprobs.float(), 0.0)
    adv = torch.where(mask, advantages.float(), 0.0)
    weights = torch.where(mask, loss_weights.float(), 0.0)
    inf = torch.tensor(float("inf"), device=logp.device)

    # Rollout correction: ratio against the trainer's old logprobs, weighted by w_is.
    w_is = torch.ones_like(logp)
    truncated = torch.zeros_like(mask)
    old = behaviour
    if rollout_correction is not None:
        old = torch.where(mask, old_logprobs.detach().float(), 0.0)
        w_is = torch.exp(old - behaviour)
        truncated = (w_is > rollout_correction_cap) & mask
    w_max = torch.where(mask, w_is, -inf).amax() if w_is.numel() else -inf
    w_sum = w_is[mask].sum()
    if rollout_correction == "truncate":
        w_is = w_is.clamp(max=rollout_correction_cap)
    elif rollout_correction == "mask":
        w_is = torch.where(truncated, 0.0, 1.0)

    log_ratio = logp - old
    if importance_ratio == "sequence":
        log_ratio = _sequence_mean(log_ratio, seq_ids, mask)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    if policy_loss == "clip":
        term = -torch.minimum(ratio * adv, clipped_ratio * adv)
    else:  # cispo
        term = -clipped_ratio.detach() * adv * logp
    policy = (weights * w_is * term).sum()

    if beta > 0:
        ref = torch.where(mask, ref_logprobs.float(), 0.0)
        log_ratio_ref = ref - logp
        k3 = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        kl_loss = beta * (weights * k3).sum()
        kl_sum = k3.detach()[mask].sum()
    else:
        kl_loss = torch.zeros((), device=logp.device)
        kl_sum = torch.zeros((), device=logp.device)

    r = ratio.detach()
    if policy_loss == "clip":  # where the clip cut the gradient
        low, high = (r < 1.0 - epsilon_low) & (adv < 0), (r > 1.0 + epsilon_high) & (adv > 0)
    else:  # where the CISPO weight was clipped
        low, high = r < 1.0 - epsilon_low, r > 1.0 + epsilon_high
    stats = LossStats(
        tokens=mask.sum().to(f32),
        clipped_low=(low & mask).sum().to(f32),
        clipped_high=(high & mask).sum().to(f32),
        kl_sum=kl_sum,
        ratio_sum=r[mask].sum(),
        ratio_min=torch.where(mask, r, inf).amin() if r.numel() else inf,
        ratio_max=torch.where(mask, r, -inf).amax() if r.numel() else -inf,
        policy_loss=policy.detach(),
        kl_loss=kl_loss.detach(),
        is_weight_sum=w_sum.detach(),
        is_weight_max=w_max.detach(),
        is_truncated=truncated.sum().to(f32),
    )
    return policy + kl_loss, stats


def _check_settings(
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    importance_ratio: str,
    policy_loss: str,
    rollout_correction: str | None,
    rollout_correction_cap: float,
) -> None:
    if not 0 <= epsilon_low <= 1:
        raise ValueError(f"epsilon_low must be in [0, 1], got {epsilon_low}")
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (0: no KL penalty), got {beta}")
    for name, value, choices in (
        ("importance_ratio", importance_ratio, IMPORTANCE_RATIOS),
        ("policy_loss", policy_loss, POLICY_LOSSES),
        ("rollout_correction", rollout_correction, (None, *ROLLOUT_CORRECTIONS)),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    if rollout_correction_cap < 1:
        raise ValueError(f"rollout_correction_cap must be >= 1, got {rollout_correction_cap}")


def _sequence_mean(values: Tensor, seq_ids: Tensor, mask: Tensor) -> Tensor:
    """Each trained token's value replaced by the mean over its sequence (same ``seq_ids``);
    differentiable. Untrained positions get 0."""
    ids = torch.where(mask, seq_ids, 0).long()
    n = int(ids.max()) + 1 if ids.numel() else 0
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(
        0, ids[mask], values[mask]
    )
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(
        0, ids[mask], torch.ones_like(values[mask])
    )
    means = sums / counts.clamp(min=1)
    return torch.where(mask, means[ids], 0.0)


class GRPOLoss:
    """The policy loss, built from the config's ``loss`` section (torchtune style). Every
    variant is a setting of this one component (docs/loss.md maps them to TRL and verl):

        loss:
          _component_: packrl.rl.loss.GRPOLoss
          epsilon_low: 0.2
          epsilon_high: 0.2
          beta: 0.0                  # k3 KL penalty to the reference; 0 keeps no reference
          loss_type: grpo            # grpo | dapo | dr_grpo: how token losses are aggregated
          importance_ratio: token    # token (GRPO) | sequence (GSPO)
          policy_loss: clip          # clip (PPO surrogate) | cispo
          rollout_correction: auto   # null | truncate | mask | auto
          rollout_correction_cap: 2.0
          mask_truncated_completions: false

    Args:
        epsilon_low, epsilon_high: the clip range [1 - epsilon_low, 1 + epsilon_high] of the
            importance ratio (DAPO's "clip-higher" when epsilon_high > epsilon_low). With
            ``importance_ratio: sequence`` it bounds the sequence ratio: GSPO's paper uses
            3e-4 and 4e-4. With ``policy_loss: cispo`` it bounds the (detached) weight;
            epsilon_low: 1.0 leaves it unbounded below, as MiniMax-M1 does.
        beta: weight of the k3 KL penalty to the reference model.
        loss_type: the aggregation, see ``completion_loss_weights``.
        importance_ratio, policy_loss, rollout_correction, rollout_correction_cap: see
            ``grpo_loss``. "auto" turns the correction on ("truncate") for engines whose
            logprobs are not the trainer's (vLLM) and off for the native sampler, whose
            logprobs match the trainer's to about 1e-5.
        mask_truncated_completions: completions cut at max_new_tokens get loss weight 0
            (TRL's ``mask_truncated_completions``; DAPO's overlong filtering). They still
            count in the number of sequences of "grpo" and "dr_grpo".

    Raises:
        ValueError: a setting out of range (named).
    """

    def __init__(
        self,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.0,
        loss_type: str = "grpo",
        importance_ratio: str = "token",
        policy_loss: str = "clip",
        rollout_correction: str | None = "auto",
        rollout_correction_cap: float = 2.0,
        mask_truncated_completions: bool = False,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
        auto = rollout_correction == "auto"
        _check_settings(epsilon_low, epsilon_high, beta, importance_ratio, policy_loss,
                        None if auto else rollout_correction, rollout_correction_cap)  # fmt: skip
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.beta, self.loss_type = beta, loss_type
        self.importance_ratio, self.policy_loss = importance_ratio, policy_loss
        self.rollout_correction = rollout_correction
        self.rollout_correction_cap = rollout_correction_cap
        self.mask_truncated_completions = mask_truncated_completions

    def resolve_auto(self, logprobs_match_trainer: bool) -> None:
        """Settle ``rollout_correction: auto`` for the sampler in use."""
        if self.rollout_correction == "auto":
            self.rollout_correction = None if logprobs_match_trainer else "truncate"

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether the update must keep the trainer's logprobs from before its first step."""
        return self.rollout_correction is not None

    def assign_loss_weights(self, groups: Sequence[GroupRollout], max_new_tokens: int) -> None:
        """Set each group's ``loss_weights`` from the lengths of all the step's completions
        (the aggregation spans the whole batch, so micro-batches and ranks add up)."""
        lengths = [
            0 if self.mask_truncated_completions and not c.finished else len(c.token_ids)
            for g in groups
            for c in g.completions
        ]
        weights = completion_loss_weights(lengths, self.loss_type, max_new_tokens)
        at = 0
        for g in groups:
            g.loss_weights = weights[at : at + g.group_size]
            at += g.group_size

    def __call__(
        self,
        logprobs: Tensor,
        batch: PackedBatch,
        mask: Tensor,
        ref_logprobs: Tensor | None = None,
        old_logprobs: Tensor | None = None,
    ) -> tuple[Tensor, LossStats]:
        """The loss of a packed (micro-)batch: logprobs [R, S] of ``batch``'s tokens under
        the policy, ``mask`` [R, S] bool the tokens to train (``batch.trained``, or none for a
        filler micro-batch), ``ref_logprobs`` [R, S] under the reference (when beta > 0),
        ``old_logprobs`` [R, S] under the policy before this step's first optimizer step
        (when ``needs_old_logprobs``)."""
        if self.rollout_correction == "auto":
            raise RuntimeError("call resolve_auto() before the loss (rollout_correction: auto)")
        return grpo_loss(
            logprobs,
            batch.behaviour_logprobs,
            batch.advantages,
            batch.loss_weights,
            mask,
            ref_logprobs,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            importance_ratio=self.importance_ratio,
            seq_ids=batch.seq_ids,
            policy_loss=self.policy_loss,
            old_logprobs=old_logprobs,
            rollout_correction=self.rollout_correction,
            rollout_correction_cap=self.rollout_correction_cap,
        )
