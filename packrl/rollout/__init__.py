"""Samplers: turn prompts into completions with sampled-token logprobs.

`NativeSampler` (KV cache, no extra dependency) is the default; `vllm_sampler` builds the
optional vLLM engine (`VLLMSampler`, docs/vllm.md). Importing this package never imports vLLM.
"""

from packrl.rollout.base import Completion, Sampler
from packrl.rollout.native import NativeSampler
from packrl.rollout.vllm_engine import VLLMSampler, vllm_sampler

__all__ = ["Completion", "NativeSampler", "Sampler", "VLLMSampler", "vllm_sampler"]
