"""The reference policy for GRPO's KL penalty.

- beta == 0: no reference at all (nothing is loaded or copied).
- LoRA: the policy itself with its adapters disabled, so the base weights are the reference
  and no second copy exists.
- Full fine-tuning: a frozen copy of the initial policy, optionally parked on CPU and moved
  to the policy's device only for its forward pass.

The caller supplies the forward as ``fn(model) -> logprobs`` (e.g. a lambda calling
``packrl.packed.logprobs.packed_logprobs`` on the same packed batch), so the reference scores
exactly the tokens and mask the policy scores.
"""

import copy
import itertools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torchtune.modules.peft import disable_adapter

T = TypeVar("T")


def _has_adapters(model: nn.Module) -> bool:
    return any(
        callable(getattr(m, "adapter_params", None)) and hasattr(m, "disabled")
        for m in model.modules()
    )


def _frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """Deep copy of ``model`` with every parameter and buffer copied straight to ``device``
    (never a second full copy on the policy's device), frozen and in eval mode.

    Pre-filling deepcopy's memo with the new tensors keeps tied weights tied.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    ref = copy.deepcopy(model, memo)
    ref.requires_grad_(False)
    return ref.eval()


class Reference:
    """Reference-policy forward passes: ``ref.logprobs(fn)`` runs ``fn(model)`` under
    ``torch.no_grad`` with the reference weights in place and returns its result."""

    def __init__(self, model: nn.Module, *, lora: bool, offload_to_cpu: bool = False):
        self.lora = lora
        self.offload_to_cpu = offload_to_cpu
        self.device = next(itertools.chain(model.parameters(), model.buffers())).device
        if lora:
            if offload_to_cpu:
                raise ValueError(
                    "reference offload_to_cpu=True applies to full fine-tuning only: under LoRA "
                    "the reference is the policy's own base weights (no copy). Set it to False."
                )
            if not _has_adapters(model):
                raise ValueError(
                    "lora=True but the model has no LoRA adapters; build it with a lora_* "
                    "builder or set lora=False for a full-copy reference"
                )
            self.model = model
        else:
            # On a CPU-only run the copy is on CPU anyway and offloading moves nothing.
            self.model = _frozen_copy(model, torch.device("cpu") if offload_to_cpu else self.device)

    @torch.no_grad()
    def logprobs(self, fn: Callable[[nn.Module], T]) -> T:
        """Run ``fn(reference_model)`` without gradient; [R, S] in, [R, S] out for packed
        logprobs, but any result type passes through."""
        if self.lora:
            was_training = self.model.training
            self.model.eval()
            try:
                with disable_adapter(self.model):
                    return fn(self.model)
            finally:
                self.model.train(was_training)
        if not self.offload_to_cpu:
            return fn(self.model)
        self.model.to(self.device)
        try:
            return fn(self.model)
        finally:
            self.model.to("cpu")


def reference_for(
    model: nn.Module, *, lora: bool, beta: float, offload_to_cpu: bool = False
) -> Reference | None:
    """The reference for ``model``, or None when ``beta == 0`` (nothing loaded or copied).

    Call it before the policy has trained (the full-copy reference snapshots the weights as
    they are now) and before KV caches are set up on the model (they would be copied too).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta == 0:
        return None
    return Reference(model, lora=lora, offload_to_cpu=offload_to_cpu)
