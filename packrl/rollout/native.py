"""Batched KV-cache sampler for a torchtune ``TransformerDecoder`` (full or LoRA).

How a chunk of at most ``max_batch_size`` sequences is generated:

1. The distinct prompts of the chunk are left-padded to one length ``Lp`` and prefilled once
   (``U`` rows), with RoPE positions that start at 0 on each prompt's first real token and a
   causal mask that hides the padding.
2. The KV cache rows are copied out to one row per sequence (``num_samples`` per prompt), so
   a prompt is prefilled once however many samples it gets. The batch is rounded up to a
   power of two ``B`` with filler rows, and the cache length ``L`` (``Lp`` + max_new_tokens)
   up to a multiple of ``CACHE_LEN_MULTIPLE``: these are the shape buckets.
3. Decoding runs one token per step for every row (``NativeSampler._step``: the layers, the
   output head and sampling; the layer and the head+sampling are compiled once per bucket
   unless ``compile=False``). The cache slot
   of step ``t`` is ``Lp + t`` for all rows, while each row's RoPE position is its own
   ``len(prompt) + t``. A row stops recording when it samples a stop token; when the live rows
   fit a smaller bucket they move there (with the cache rows), and the chunk ends when all
   are done.

Only the sampled tokens' log-probabilities leave a step. The cache is plain tensors
(``kv_cache.StaticKVCache``), never attached to the model, so training forwards see a plain
model.
"""

import copy
import random
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchtune.modules import RMSNorm, TransformerDecoder
from torchtune.training import get_dtype
from tqdm.auto import tqdm

from packrl.rollout.base import Completion, check_generate_args, prompt_seeds
from packrl.rollout.kv_cache import (
    StaticKVCache,
    cached_forward,
    layer_forward,
    self_attention_layers,
)
from packrl.training.distributed import full_parameters, world

# Cache lengths are rounded up to this, so that prompts of similar length share a shape (one
# CUDA graph recording per shape; on CPU the compiled graphs take any length).
CACHE_LEN_MULTIPLE = 128
# Top-p looks at this many most likely tokens first (see _sample_wide).
TOP_P_CANDIDATES = 64


class NativeSampler:
    """Samples completions from a torchtune decoder with a KV cache.

    Args:
        model: a torchtune ``TransformerDecoder`` (plain, LoRA, activation-checkpointed).
            It is switched to eval mode during ``generate`` and restored afterwards. Under
            torchrun (world size > 1) the sampler keeps its own unsharded copy: build it
            before sharding the policy, and call ``sync_weights`` after each update.
        stop_token_ids: a sequence ends when it samples one of these (the token is kept).
        pad_id: token used for left padding and for rows that already finished; never attended.
        max_batch_size: most sequences (prompts x samples) decoded together.
        compile: run the decode step through ``torch.compile`` (one graph per batch size,
            cache length and sampling setting; CUDA graphs on CUDA). False runs the same step
            eagerly: no compile time, more per-step overhead.
        dtype: the precision decoding runs in: ``"fp32"``, ``"bf16"`` (torchtune's names) or
            None for the model's own. Another precision than the model's keeps a cast copy
            of the model for decoding (refreshed by ``sync_weights``): bf16 halves the bytes
            each decode step reads, ~1.9x faster on a CPU with AVX512-BF16
            (docs/benchmarks.md). Its behaviour logprobs are then not the trainer's
            (``logprobs_match_trainer`` is False), so the loss's rollout correction "auto"
            turns on, as for vLLM.

    Attributes:
        logprobs_match_trainer: True when decoding runs in the model's own precision (the
            same model and math as the trainer: behaviour logprobs match its to ~1e-5).
        compile_seconds: wall time of the decode steps that compiled a new graph (each such
            step's own compute included), summed over the sampler's life.
        step_shapes: the (batch, cache length, temperature, top_p, top_k) keys seen so far;
            with ``compile`` each is one compiled graph.
    """

    def __init__(
        self,
        model: TransformerDecoder,
        *,
        stop_token_ids: list[int],
        pad_id: int,
        max_batch_size: int = 64,
        compile: bool = False,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, TransformerDecoder):
            raise TypeError(
                f"model: expected a torchtune TransformerDecoder, got {type(model).__name__}"
            )
        vocab_size = model.tok_embeddings.num_embeddings
        for name, ids in (("stop_token_ids", list(stop_token_ids)), ("pad_id", [pad_id])):
            if any(not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
                raise ValueError(f"{name}: token ids must be ints in [0, {vocab_size}), got {ids}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        model_dtype = model.tok_embeddings.weight.dtype
        try:
            decode_dtype = model_dtype if dtype is None else get_dtype(dtype, torch.device("cpu"))
        except ValueError as e:
            raise ValueError(f"dtype: {e} (use 'fp32', 'bf16' or null)") from None
        self.logprobs_match_trainer = decode_dtype == model_dtype
        # Under torchrun the recipe shards the policy after building the sampler; decoding
        # then runs on this unsharded copy, refreshed by sync_weights after each update. The
        # same holds for a copy in another precision.
        if world()[0] > 1 or decode_dtype != model_dtype:
            self.model = copy.deepcopy(model).to(decode_dtype)
            self.model.requires_grad_(False)
            for m in self.model.modules():
                if isinstance(m, RMSNorm):
                    m.float()  # torchtune's RMSNorm computes in fp32: fp32 scales keep it fused
        else:
            self.model = model
        self._layers = self_attention_layers(self.model)
        self.stop_token_ids = list(stop_token_ids)
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.compile = compile
        self.compile_seconds = 0.0
        self.step_shapes: set[tuple] = set()
        self._compiled: tuple[Callable, Callable] | None = None
        self._static_caches: dict[tuple[int, int], StaticKVCache] = {}

    @torch.no_grad()
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

        ``temperature=0`` is greedy decoding (top-p / top-k are then irrelevant). ``seed`` is
        one seed for the call or one per prompt. Each sequence draws its random numbers from
        its own stream, keyed by (its prompt's seed, its sample index), so a prompt's samples
        do not depend on which other prompts share the call or the batch: a step split across
        ranks samples what one process would. ``seed=None`` draws one from torch's global RNG,
        so ``torch.manual_seed`` makes the call reproducible too.
        """
        self._check_args(prompts, num_samples, max_new_tokens, temperature, top_p, top_k)
        seeds = prompt_seeds(seed, len(prompts))

        # One row per sequence, prompt-major, cut into chunks of at most max_batch_size.
        rows = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
        out: list[list[Completion]] = [[] for _ in prompts]
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # no dropout (LoRA dropout included) while sampling
        try:
            with tqdm(total=len(rows), unit="seq", desc="generate", disable=not progress) as bar:
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = rows[start : start + self.max_batch_size]
                    completions = self._generate_chunk(
                        [p for p, _ in chunk],
                        prompts,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                        streams=[f"{seeds[p]}/{s}" for p, s in chunk],
                    )
                    for (p, _), completion in zip(chunk, completions, strict=True):
                        out[p].append(completion)
                    bar.update(len(chunk))
        finally:
            for module, training in modes.items():
                module.training = training
        return out

    def _generate_chunk(
        self,
        row_prompts: list[int],
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int | None,
        streams: list[str],
    ) -> list[Completion]:
        """Generates one completion per entry of ``row_prompts`` (indices into ``prompts``),
        the random numbers of row i drawn from the stream seeded by ``streams[i]``."""
        model, layers = self.model, self._layers
        device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
        unique = sorted(set(row_prompts))
        lens = torch.tensor([len(prompts[p]) for p in unique], device=device)  # [U]
        n_unique, prompt_len = len(unique), int(lens.max())
        cache_len = _round_up(prompt_len + max_new_tokens, CACHE_LEN_MULTIPLE)

        # Left-padded prompts [U, Lp]; pad positions get RoPE position 0 (they are never seen).
        tokens = torch.full((n_unique, prompt_len), self.pad_id, dtype=torch.long, device=device)
        for u, p in enumerate(unique):
            tokens[u, prompt_len - len(prompts[p]) :] = torch.tensor(prompts[p], device=device)
        pad_len = prompt_len - lens  # [U]
        positions = (torch.arange(prompt_len, device=device) - pad_len[:, None]).clamp(min=0)
        # key_valid[u, j]: cache slot j holds a real token of row u. [U, cache_len]
        slots = torch.arange(cache_len, device=device)
        key_valid = (slots[None, :] >= pad_len[:, None]) & (slots[None, :] < prompt_len)
        # Prefill mask [U, Lp, cache_len]: causal, no padding keys; a pad query sees itself so
        # its row is never all-masked (some SDPA kernels return NaN there, which would then
        # leak through the cache as 0 * NaN).
        causal = slots[None, :] <= torch.arange(prompt_len, device=device)[:, None]
        diagonal = slots[None, :] == torch.arange(prompt_len, device=device)[:, None]
        mask = (causal[None] & key_valid[:, None, :]) | diagonal[None]
        prefill_cache = StaticKVCache.zeros(layers, n_unique, cache_len, device=device, dtype=dtype)
        hidden = cached_forward(
            model, layers, tokens, positions, mask, slots[:prompt_len], prefill_cache
        )  # [U, Lp, D]
        logits = model.output(model.norm(hidden[:, -1])).float()  # [U, V]

        # One row per sequence, the batch rounded up to its bucket (_bucket) with filler rows
        # (copies of row 0, done from the start) so that decode steps come in few shapes.
        n_rows = len(row_prompts)
        batch = _bucket(n_rows, self.max_batch_size)
        src = torch.tensor([unique.index(p) for p in row_prompts], device=device)  # [n_rows]
        src = torch.cat([src, src[:1].expand(batch - n_rows)])  # [B]
        cache = prefill_cache.copy_rows(src, self._cache(batch, cache_len))
        del prefill_cache
        logits, key_valid, next_pos = logits[src], key_valid[src], lens[src]
        row_ids = torch.arange(batch, device=device)  # chunk sequence held by each row
        done = row_ids >= n_rows
        # One uniform per sequence and step [B, T], from each sequence's own stream.
        uniforms = torch.tensor(
            [[r.random() for _ in range(max_new_tokens)] for r in map(random.Random, streams)]
            + [[0.0] * max_new_tokens] * (batch - n_rows),
            dtype=torch.float64,
        ).to(device)
        stop_ids = torch.tensor(self.stop_token_ids, dtype=torch.long, device=device)
        token_ids: list[list[int]] = [[] for _ in range(n_rows)]
        logprobs: list[list[float]] = [[] for _ in range(n_rows)]
        finished = [False] * n_rows
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)

        tok, tok_logprob = _sample_wide(logits, uniforms[:, 0], **sampling)  # [B], eager
        for step in range(max_new_tokens):
            for r, t, lp, d in zip(
                row_ids.tolist(), tok.tolist(), tok_logprob.tolist(), done.tolist(), strict=True
            ):
                if not d:
                    token_ids[r].append(t)
                    logprobs[r].append(lp)
            stopped = torch.isin(tok, stop_ids) & ~done
            for r in row_ids[stopped].tolist():
                finished[r] = True
            done |= stopped
            alive = int((~done).sum())
            if alive == 0 or step == max_new_tokens - 1:
                break
            smaller = _bucket(alive, self.max_batch_size)
            if smaller < len(done):
                # Move the live rows to a smaller batch bucket: copying the cache once is
                # cheaper than carrying finished rows; fillers are finished rows, still done.
                order = torch.argsort(done.to(torch.int8), stable=True)[:smaller]
                cache = cache.copy_rows(order, self._cache(len(order), cache_len))
                tok, key_valid, next_pos = tok[order], key_valid[order], next_pos[order]
                row_ids, done = row_ids[order], done[order]
            tok = tok.masked_fill(done, self.pad_id)
            slot = torch.tensor([prompt_len + step], device=device)
            tok, tok_logprob, logits, short = self._step(
                tok, next_pos, key_valid, slot, cache, uniforms[row_ids, step + 1], sampling
            )
            if bool(short.any()):
                tok, tok_logprob = _sample_wide(logits, uniforms[row_ids, step + 1], **sampling)
            next_pos = next_pos + 1

        return [
            Completion(t, lp, f) for t, lp, f in zip(token_ids, logprobs, finished, strict=True)
        ]

    def _step(
        self,
        tok: torch.Tensor,
        pos: torch.Tensor,
        key_valid: torch.Tensor,
        slot: torch.Tensor,
        cache: StaticKVCache,
        uniforms: torch.Tensor,
        sampling: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step: feeds tokens ``tok`` [B] at RoPE positions ``pos`` [B], writes
        their keys and values at cache slot ``slot`` [1] (marking it in ``key_valid`` [B, L],
        in place) and samples every row's next token with its uniform (``uniforms`` [B]).
        Returns what ``_sample_head`` returns. Times the steps that meet a new shape."""
        key = (len(tok), cache.length, *sampling.values())
        new = key not in self.step_shapes
        start = time.perf_counter()
        layer_fn, head_fn = layer_forward, _sample_head
        if self.compile:
            layer_fn, head_fn = self._compiled_step_parts(tok.device)
            if tok.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # last step's outputs are spent
        key_valid.index_fill_(1, slot, True)
        hidden = cached_forward(
            self.model,
            self._layers,
            tok[:, None],
            pos[:, None],
            key_valid[:, None, :],
            slot,
            cache,
            layer_fn,
        )  # [B, 1, D]
        out = head_fn(self.model, hidden[:, -1], uniforms, **sampling)
        if new:
            self.step_shapes.add(key)
            if self.compile:
                self.compile_seconds += time.perf_counter() - start
        return out

    def _compiled_step_parts(self, device: torch.device) -> tuple[Callable, Callable]:
        """``layer_forward`` and ``_sample_head`` through ``torch.compile``, made once.

        The layer is compiled, not the whole step: every layer has the same code and shapes,
        so one graph serves all of them (only the weights differ, and they are inputs), and a
        cold compile takes seconds instead of minutes on a 2-core CPU. Shapes are dynamic, so
        one graph per part also serves every batch bucket and cache length (sampling settings
        are constants: the head gets one graph per setting). On CUDA, CUDA graphs
        ("reduce-overhead", untested here) replay each part without launching its kernels one
        by one, recorded once per shape.
        """
        if self._compiled is None:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._compiled = tuple(
                torch.compile(fn, mode=mode, dynamic=True) for fn in (layer_forward, _sample_head)
            )
        return self._compiled

    def _cache(self, batch: int, length: int) -> StaticKVCache:
        """A decode cache of ``batch`` x ``length`` slots. On CUDA one per shape, kept and
        marked static so that CUDA graphs can replay steps that write into it; elsewhere a
        fresh one (freed with the chunk)."""
        device = self.model.tok_embeddings.weight.device
        dtype = self.model.tok_embeddings.weight.dtype
        if device.type != "cuda":
            return StaticKVCache.zeros(self._layers, batch, length, device=device, dtype=dtype)
        key = (batch, length)
        if key not in self._static_caches:
            cache = StaticKVCache.zeros(self._layers, batch, length, device=device, dtype=dtype)
            for t in cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
            self._static_caches[key] = cache
        return self._static_caches[key]

    def close(self) -> None:
        """Drops the caches kept per shape on CUDA (the model is the policy or a plain copy
        of it: nothing else to release)."""
        self._static_caches.clear()

    @torch.no_grad()
    def sync_weights(self, policy: nn.Module) -> None:
        """Copy `policy`'s trainable weights into the sampling model (cast to its precision),
        unless it is the policy itself (one device, same precision: nothing to do). Under FSDP
        the sampler holds an unsharded copy, because decoding through sharded layers would
        all-gather each layer for every token, in lockstep on all ranks; the shards are
        gathered here once per optimizer step."""
        if policy is self.model:
            return
        own = dict(full_parameters(self.model))  # views of the sampling model's parameters
        for name, tensor in full_parameters(policy, trainable_only=True):
            own[name].copy_(tensor)

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
            vocab_size=self.model.tok_embeddings.num_embeddings,
            max_len=self.model.max_seq_len,
            max_len_fix=f"the model's max_seq_len={self.model.max_seq_len}; shorten the prompt "
            "or lower max_new_tokens",
        )
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: must be >= 1 or None (no top-k), got {top_k}")


def _sample_head(
    model: TransformerDecoder,
    hidden: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final norm, output projection and ``_sample`` for hidden states [B, D]. Returns the
    sampled tokens [B], their logprobs [B], the fp32 logits [B, V] and ``short`` [B] (rows
    whose top-p set did not fit in ``TOP_P_CANDIDATES`` tokens: redraw with ``_sample_wide``).
    """
    logits = model.output(model.norm(hidden)).float()  # [B, V]
    tok, tok_logprob, short = _sample(
        logits, uniforms, temperature=temperature, top_p=top_p, top_k=top_k
    )
    return tok, tok_logprob, logits, short


def _sample(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int | None,
    candidates: int = TOP_P_CANDIDATES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws one token per row from logits [B, V] (fp32), with one uniform in [0, 1) per row
    (uniforms [B]).

    Returns tokens [B], their log-probs [B] under softmax(logits / temperature), taken
    before top-k / top-p truncation (softmax(logits) when greedy), and ``short`` [B]: True
    where top-p needed more than ``candidates`` tokens, so the row's token is not valid.
    """
    short = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if temperature == 0:
        tok = logits.argmax(dim=-1)
        return tok, _token_logprob(logits, tok), short
    scaled = logits / temperature
    filtered = scaled
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [B, 1]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        filtered, short = _top_p_filter(filtered, top_p, candidates)
    tok = _draw(filtered.softmax(dim=-1), uniforms)
    return tok, _token_logprob(scaled, tok), short


def _sample_wide(
    logits: torch.Tensor, uniforms: torch.Tensor, **sampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sample`` (eager), widening the top-p candidates x8 until every row's top-p set fits.

    A full sort of [B, V] costs more than a decode step on CPU (~0.3 s for 32 x 49152); the
    kept set is usually small, so start from the top ``TOP_P_CANDIDATES`` tokens.
    """
    candidates = TOP_P_CANDIDATES
    while True:
        tok, tok_logprob, short = _sample(logits, uniforms, candidates=candidates, **sampling)
        if not bool(short.any()):
            return tok, tok_logprob
        candidates *= 8


def _top_p_filter(
    logits: torch.Tensor, top_p: float, candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets to -inf all but the smallest set of most likely tokens whose probability mass
    reaches top_p, per row of logits [B, V], looking only at each row's ``candidates`` most
    likely tokens. Returns the filtered logits [B, V] and ``short`` [B]: rows whose candidates
    hold less than top_p (never when the candidates are the whole vocabulary)."""
    vocab = logits.shape[-1]
    k = min(candidates, vocab)
    log_total = logits.logsumexp(dim=-1, keepdim=True)  # [B, 1]
    values, order = torch.topk(logits, k, dim=-1)  # [B, k], descending
    probs = (values - log_total).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    short = (mass_before[:, -1] + probs[:, -1] < top_p) & (k < vocab)
    values = values.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, values), short


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [B, V] by inverse CDF of the row's uniform (uniforms [B]).

    torch.multinomial draws V exponentials per row instead, ~20x slower on CPU at V=49152.
    """
    cdf = probs.cumsum(dim=-1)  # [B, V]
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    # right=True: the first token whose cdf exceeds u, so zero-probability tokens never win.
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    # u can round up to the total; never return a token the filters removed.
    allowed = probs.gather(-1, tok[:, None]).squeeze(1) > 0
    return torch.where(allowed, tok, probs.argmax(dim=-1))


def _token_logprob(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tok] for logits [B, V], tok [B] -> [B]."""
    return logits.gather(-1, tok[:, None]).squeeze(1) - logits.logsumexp(dim=-1)


def _bucket(n: int, max_batch_size: int) -> int:
    """The batch size ``n`` rows are decoded at: n rounded up to a power of two, but at most
    ``max_batch_size`` (when n fits it) and at least 2 (with dynamic shapes, torch.compile
    gives size 1 a graph of its own; a second row costs little where weights dominate)."""
    return max(2, min(1 << (n - 1).bit_length(), max(n, max_batch_size)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
