"""Batched KV-cache sampler for a torchtune ``TransformerDecoder`` (full or LoRA).

How a chunk of at most ``max_batch_size`` sequences is generated:

1. The distinct prompts of the chunk are left-padded to one length ``Lp`` and prefilled once
   (``U`` rows), with RoPE positions that start at 0 on each prompt's first real token and a
   causal mask that hides the padding.
2. The KV cache rows are copied out to one row per sequence (``B`` rows, ``num_samples`` per
   prompt), so a prompt is prefilled once however many samples it gets.
3. Decoding runs one token per step for every row. The cache slot of step ``t`` is
   ``Lp + t`` for all rows, while each row's RoPE position is its own ``len(prompt) + t``.
   A row stops recording when it samples a stop token; once a quarter of the rows are done
   they are dropped from the batch (and the cache), and the chunk ends when all are done.

Only the sampled tokens' log-probabilities leave a step; the full-vocabulary logits of a step
are dropped when the next one starts. The caches are torchtune's (``local_kv_cache``) and are
deleted when a chunk ends, so training forwards afterwards see a plain model.
"""

import copy
import random
from collections.abc import Sequence

import torch
from torch import nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache
from torchtune.modules.kv_cache import KVCache
from tqdm.auto import tqdm

from packrl.rollout.base import Completion, check_generate_args, prompt_seeds
from packrl.training.distributed import full_parameters, world


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
    """

    def __init__(
        self,
        model: TransformerDecoder,
        *,
        stop_token_ids: list[int],
        pad_id: int,
        max_batch_size: int = 64,
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
        # Under torchrun the recipe shards the policy after building the sampler; decoding
        # then runs on this unsharded copy, refreshed by sync_weights after each update.
        self.model = copy.deepcopy(model) if world()[0] > 1 else model
        self.stop_token_ids = list(stop_token_ids)
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size

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
        model = self.model
        device = model.tok_embeddings.weight.device
        unique = sorted(set(row_prompts))
        lens = torch.tensor([len(prompts[p]) for p in unique], device=device)  # [U]
        n_unique, prompt_len = len(unique), int(lens.max())
        cache_len = prompt_len + max_new_tokens

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

        stop_ids = torch.tensor(self.stop_token_ids, dtype=torch.long, device=device)
        n_rows = len(row_prompts)
        token_ids: list[list[int]] = [[] for _ in range(n_rows)]
        logprobs: list[list[float]] = [[] for _ in range(n_rows)]
        finished = [False] * n_rows

        dtype = model.tok_embeddings.weight.dtype
        with local_kv_cache(
            model, batch_size=n_unique, device=device, dtype=dtype, decoder_max_seq_len=cache_len
        ):
            logits = self._last_logits(tokens, mask, positions)  # [U, V]

            # Expand from one row per prompt to one row per sequence.
            src = torch.tensor([unique.index(p) for p in row_prompts], device=device)  # [B]
            _select_cache_rows(model, src)
            logits, key_valid, next_pos = logits[src], key_valid[src], lens[src]
            row_ids = torch.arange(n_rows, device=device)  # chunk sequence held by each row
            # One uniform per sequence and step [B, T], from each sequence's own stream.
            uniforms = torch.tensor(
                [[r.random() for _ in range(max_new_tokens)] for r in map(random.Random, streams)],
                dtype=torch.float64,
            ).to(device)
            done = torch.zeros(n_rows, dtype=torch.bool, device=device)

            for step in range(max_new_tokens):
                tok, tok_logprob = _sample(
                    logits, temperature, top_p, top_k, uniforms[row_ids, step]
                )  # [B]
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
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                if 4 * int(done.sum()) >= len(done):
                    # Drop finished rows: copying the cache once is cheaper than carrying them.
                    keep = (~done).nonzero().squeeze(1)
                    _select_cache_rows(model, keep)
                    tok, key_valid, next_pos = tok[keep], key_valid[keep], next_pos[keep]
                    row_ids, done = row_ids[keep], done[keep]
                tok = tok.masked_fill(done, self.pad_id)
                key_valid[:, prompt_len + step] = True
                # Decode mask [B, 1, cache_len]: slots not yet written are still False.
                logits = self._last_logits(tok[:, None], key_valid[:, None, :], next_pos[:, None])
                next_pos = next_pos + 1

        return [
            Completion(t, lp, f) for t, lp, f in zip(token_ids, logprobs, finished, strict=True)
        ]

    def _last_logits(
        self, tokens: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor
    ) -> torch.Tensor:
        """Runs tokens [B, S] through the cached model; returns fp32 logits [B, V] of the last
        position. Walks the layers itself (as TransformerDecoder.forward does) so the prefill
        never builds [B, S, V] logits and chunked output (set for training) does not apply."""
        model = self.model
        h = model.tok_embeddings(tokens)  # [B, S, D]
        for layer in model.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        return model.output(model.norm(h[:, -1])).float()  # [B, V]

    def close(self) -> None:
        """Nothing to release: the sampling model is the policy or a plain copy of it."""

    @torch.no_grad()
    def sync_weights(self, policy: nn.Module) -> None:
        """Copy `policy`'s trainable weights into the sampling model, unless it is the policy
        itself (one device: nothing to do). Under FSDP the sampler holds an unsharded copy,
        because decoding through sharded layers would all-gather each layer for every token,
        in lockstep on all ranks; the shards are gathered here once per optimizer step."""
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


def _select_cache_rows(model: nn.Module, rows: torch.Tensor) -> None:
    """Keeps (or repeats) the KV cache rows ``rows`` [B'] in every layer's cache."""
    for module in model.modules():
        if isinstance(module, KVCache):
            module.k_cache = module.k_cache.index_select(0, rows)
            module.v_cache = module.v_cache.index_select(0, rows)
            module.batch_size = len(rows)


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int | None,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row from logits [B, V] (fp32), with one uniform in [0, 1) per row
    (uniforms [B]).

    Returns tokens [B] and their log-probs [B] under softmax(logits / temperature), taken
    before top-k / top-p truncation (softmax(logits) when greedy).
    """
    if temperature == 0:
        tok = logits.argmax(dim=-1)
        return tok, _token_logprob(logits, tok)
    scaled = logits / temperature
    filtered = scaled
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [B, 1]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        filtered = _top_p_filter(filtered, top_p)
    tok = _draw(filtered.softmax(dim=-1), uniforms)
    return tok, _token_logprob(scaled, tok)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sets to -inf all but the smallest set of most likely tokens whose probability mass
    reaches top_p, per row of logits [B, V].

    A full sort of [B, V] costs more than a decode step on CPU (~0.3 s for 32 x 49152); the
    kept set is usually small, so take the top 64 and widen (x8) only while some row's top
    tokens fall short of top_p.
    """
    vocab = logits.shape[-1]
    log_total = logits.logsumexp(dim=-1, keepdim=True)  # [B, 1]
    k = min(64, vocab)
    while True:
        values, order = torch.topk(logits, k, dim=-1)  # [B, k], descending
        probs = (values - log_total).exp()
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        if k == vocab or bool((mass_before[:, -1] + probs[:, -1] >= top_p).all()):
            break
        k = min(8 * k, vocab)
    values = values.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, values)


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
