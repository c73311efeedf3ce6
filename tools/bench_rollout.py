"""Rollout throughput: NativeSampler on SmolLM2-135M at the CPU demo shape, one run.

    python tools/bench_rollout.py --json outputs/bench_rollout.json

Generates 4 short arithmetic chat prompts (~60 tokens) x 8 samples x 64 new tokens (the GRPO
CPU demo's rollout) with the native sampler at max_batch_size 1, 8 and 32 (each timed on its
first ``--chunks`` chunks), and with ``--torchtune`` all 32 sequences with torchtune's own
``generate`` (KV cache, left padding, one row per sequence, returns full logits) as an outside
baseline. Variants run interleaved, ``--repeats`` times; the JSON holds per-variant medians of
generated tokens per second (stop tokens included, as in training) and the ratios to batch 1.
"""

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torchtune.generation import generate as torchtune_generate
from tqdm.auto import tqdm

from packrl.models import ChatTokenizer, ensure_smollm2_checkpoint, load_smollm2
from packrl.rollout import NativeSampler


def arithmetic_prompts(tokenizer: ChatTokenizer, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = (
            f"What is {a} + {b}? Think step by step, then put the final answer in \\boxed{{}}."
        )
        prompts.append(tokenizer.tokenize_messages([{"role": "user", "content": question}]))
    return prompts


def throughput_results(
    times: dict[str, list[float]], tokens: dict[str, list[int]]
) -> dict[str, dict]:
    """Per variant: median tokens/s and seconds over its repeats, plus the raw runs."""
    results = {}
    for name in times:
        rates = [n / t for n, t in zip(tokens[name], times[name], strict=True)]
        results[name] = {
            "tokens_per_s_median": statistics.median(rates),
            "seconds_median": statistics.median(times[name]),
            "generated_tokens": tokens[name],
            "seconds": times[name],
        }
    return results


def time_variants(
    variants: dict[str, Callable[[int], int]], repeats: int, seed: int, desc: str
) -> dict[str, dict]:
    """Runs each variant (seed -> generated tokens) `repeats` times, interleaved so that load
    changes hit all alike, and returns `throughput_results` of the timings."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {name: [] for name in variants}
    with tqdm(total=repeats * len(variants), desc=desc) as bar:
        for rep in range(repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                tokens[name].append(fn(seed + rep))
                times[name].append(time.perf_counter() - start)
                bar.update(1)
    return throughput_results(times, tokens)


def report_header(benchmark: str, args: argparse.Namespace, prompts) -> dict:
    """The fields every rollout benchmark's JSON starts with: what, when, how, where."""
    return {
        "benchmark": benchmark,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"tools/{benchmark}.py", *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct fp32",
        "shape": {
            "prompts": args.prompts,
            "samples_per_prompt": args.samples,
            "new_tokens": args.new_tokens,
            "prompt_tokens": [len(p) for p in prompts],
            "temperature": args.temperature,
        },
        "threads": args.threads,
        "repeats": args.repeats,
        "seed": args.seed,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }


def write_report(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def run_native(sampler: NativeSampler, prompts, args, batch: int, seed: int) -> int:
    """Generates the first ``args.chunks`` chunks of ``batch`` sequences (prompt-major, as the
    sampler orders them) and returns the number of generated tokens. Chunks run one after
    another, so tokens/s does not depend on how many run; this keeps batch 1 affordable."""
    sequences = min(args.chunks * batch, len(prompts) * args.samples)
    if sequences < args.samples:
        prompts, num_samples = prompts[:1], sequences
    else:
        prompts, num_samples = prompts[: sequences // args.samples], args.samples
    sampler.max_batch_size = batch
    out = sampler.generate(
        prompts,
        num_samples=num_samples,
        max_new_tokens=args.new_tokens,
        temperature=args.temperature,
        seed=seed,
    )
    return sum(len(c.token_ids) for samples in out for c in samples)


def run_torchtune(model, tokenizer: ChatTokenizer, prompts, args, seed: int) -> int:
    """torchtune.generation.generate on all sequences at once (left-padded by hand)."""
    rows = [p for p in prompts for _ in range(args.samples)]
    width = max(map(len, rows))
    batch = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in rows])
    rng = torch.Generator().manual_seed(seed)
    tokens, _ = torchtune_generate(
        model,
        batch,
        max_generated_tokens=args.new_tokens,
        pad_id=tokenizer.pad_id,
        temperature=args.temperature,
        stop_tokens=tokenizer.stop_token_ids,
        rng=rng,
    )
    # Count tokens up to and including each row's first stop token, as the sampler does.
    count = 0
    stops = set(tokenizer.stop_token_ids)
    for row in tokens[:, width:].tolist():
        for t in row:
            count += 1
            if t in stops:
                break
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--chunks", type=int, default=2, help="chunks timed per native variant (see run_native)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torchtune",
        action="store_true",
        help="also time torchtune.generation.generate on all sequences at once (slow: it keeps"
        " and re-concatenates full-vocabulary logits every step)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoint = ensure_smollm2_checkpoint()
    tokenizer = ChatTokenizer.from_dir(checkpoint)
    model = load_smollm2(checkpoint)
    sampler = NativeSampler(model, stop_token_ids=tokenizer.stop_token_ids, pad_id=tokenizer.pad_id)
    prompts = arithmetic_prompts(tokenizer, args.prompts, args.seed)

    variants = {
        f"native_batch{b}": (lambda s, b=b: run_native(sampler, prompts, args, b, s))
        for b in args.batches
    }
    if args.torchtune:
        variants["torchtune_generate"] = lambda s: run_torchtune(model, tokenizer, prompts, args, s)

    sampler.generate(prompts[:1], max_new_tokens=4, seed=0)  # warm-up
    results = time_variants(variants, args.repeats, args.seed, "bench_rollout")
    base = results.get(f"native_batch{args.batches[0]}")
    if base:
        for r in results.values():
            r["speedup_vs_first_batch"] = r["tokens_per_s_median"] / base["tokens_per_s_median"]
    write_report({**report_header("bench_rollout", args, prompts), "results": results}, args.json)


if __name__ == "__main__":
    main()
