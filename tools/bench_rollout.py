"""Rollout throughput at the CPU demo shape: native sampler (eager, compiled, fp32, bf16) vs transformers.

    python tools/bench_rollout.py --json outputs/bench_rollout.json

Generates 4 short arithmetic chat prompts (~56 tokens) x 8 samples x 64 new tokens (the GRPO
CPU demo's rollout, SmolLM2-135M-Instruct, weights loaded in fp32) five ways, interleaved,
``--repeats`` times: the native sampler with its eager decode step in fp32 and in bf16
(``dtype="bf16"``: a bf16 copy of the model decodes), the same two with the compiled step
(``compile=True``), and transformers' ``generate`` (fp32, default dynamic cache, the same
prompts left-padded, ``num_return_sequences``) as the generic baseline. The JSON holds per-variant
medians of generated tokens per second (stop tokens included, as in training), the ratios,
the load average, and the compile cost apart from the timed runs: the first compile in this
process (``compile.first_s``: cold when the inductor cache directory is empty, e.g. with
``TORCHINDUCTOR_CACHE_DIR`` set to a new directory) and a recompile after
``torch._dynamo.reset()`` that finds the kernels on disk (``compile.cached_s``, what a second
run of the recipe pays). ``--profile`` adds the top operators of one compiled generation.

``--thread-divergence`` measures something else instead of speed: the eager native sampler
(fp32 and bf16, sampled at ``--temperature`` and greedy) decodes the same prompts with the
same seeds at 1 thread and at ``--threads``, and the JSON says how many sequences came out
identical and where the others first differ.
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
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


def run_native(sampler: NativeSampler, prompts, args, seed: int) -> int:
    """All prompts x samples in one chunk; returns the number of generated tokens."""
    out = sampler.generate(
        prompts,
        num_samples=args.samples,
        max_new_tokens=args.new_tokens,
        temperature=args.temperature,
        seed=seed,
    )
    return sum(len(c.token_ids) for samples in out for c in samples)


def run_transformers(hf_model, prompts, pad_id: int, stop_ids: list[int], args, seed: int) -> int:
    """transformers' ``generate`` on the same prompts (left-padded), full-vocabulary sampling
    at the same temperature (top_k=0 and top_p=1 override the checkpoint's defaults); returns
    the tokens generated up to and including each row's first stop token, as the sampler
    counts them."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    out = hf_model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=0,
        num_return_sequences=args.samples,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    count = 0
    for row in out[:, width:].tolist():
        for t in row:
            count += 1
            if t in stop_ids:
                break
    return count


def compile_cost(model, tokenizer: ChatTokenizer, prompts, args) -> dict:
    """Seconds the compiled sampler spends compiling for this shape: first in this process,
    then again after ``torch._dynamo.reset()`` with inductor's on-disk caches warm."""
    cost = {"inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default")}
    for name in ("first", "cached"):
        torch._dynamo.reset()
        sampler = NativeSampler(
            model, stop_token_ids=tokenizer.stop_token_ids, pad_id=tokenizer.pad_id, compile=True
        )
        start = time.perf_counter()
        run_native(sampler, prompts, args, args.seed)
        cost[f"{name}_s"] = sampler.compile_seconds
        cost[f"{name}_call_s"] = time.perf_counter() - start
        cost["graphs_for_shapes"] = sorted(sampler.step_shapes)
    return cost


def profile_compiled(sampler: NativeSampler, prompts, args, top: int = 15) -> list[dict]:
    """torch.profiler over one compiled generation: the operators with most self CPU time."""
    from torch.profiler import profile

    with profile() as prof:
        run_native(sampler, prompts, args, args.seed)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
        }
        for e in events[:top]
    ]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two sequences differ (a length difference counts)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def thread_divergence(model, tokenizer: ChatTokenizer, prompts, args) -> dict:
    """The same rollout at 1 thread and at ``args.threads``: identical sequences, and where the
    others part. What it looks for: if more threads made a kernel sum in another order, the
    logits would differ in their last bits, a sampled token would flip where its uniform
    draw falls that close to a CDF boundary (greedy: at a near-tie), and everything after it
    would differ. (On the dev machine nothing differed: docs/benchmarks.md.)"""
    out = {}
    for dtype in ("fp32", "bf16"):
        sampler = NativeSampler(model, stop_token_ids=tokenizer.stop_token_ids,
                                pad_id=tokenizer.pad_id, dtype=dtype,
                                max_batch_size=args.prompts * args.samples)  # fmt: skip
        for temperature in (args.temperature, 0.0):
            runs = []
            for threads in (1, args.threads):
                torch.set_num_threads(threads)
                samples = sampler.generate(prompts, num_samples=args.samples, seed=args.seed,
                                           max_new_tokens=args.new_tokens, temperature=temperature)  # fmt: skip
                runs.append([c for group in samples for c in group])
            torch.set_num_threads(args.threads)
            parts = [first_difference(a.token_ids, b.token_ids) for a, b in zip(*runs, strict=True)]
            same = [
                (a, b)
                for (a, b), p in zip(zip(*runs, strict=True), parts, strict=True)
                if p is None
            ]
            out[f"{dtype}_T{temperature:g}"] = {
                "sequences": len(parts),
                "identical": len(same),
                "first_difference_at_token": sorted(p for p in parts if p is not None),
                "max_logprob_diff_of_identical": max(
                    (abs(x - y) for a, b in same for x, y in zip(a.logprobs, b.logprobs, strict=True)), default=0.0),
            }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="profile one compiled run")
    parser.add_argument("--thread-divergence", action="store_true",
                        help="instead of timing: compare 1 thread with --threads, token for token")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    checkpoint = ensure_smollm2_checkpoint()
    tokenizer = ChatTokenizer.from_dir(checkpoint)
    model = load_smollm2(checkpoint)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    hf_model.eval()
    prompts = arithmetic_prompts(tokenizer, args.prompts, args.seed)
    load_start = os.getloadavg()
    if args.thread_divergence:
        report = report_header("bench_rollout", args, prompts)
        write_report({**report, "divergence": thread_divergence(model, tokenizer, prompts, args)}, args.json)  # fmt: skip
        return

    compile_s = compile_cost(model, tokenizer, prompts, args)
    samplers = {
        f"native_{name}": NativeSampler(
            model,
            stop_token_ids=tokenizer.stop_token_ids,
            pad_id=tokenizer.pad_id,
            max_batch_size=args.prompts * args.samples,
            compile=compiled,
            dtype=dtype,
        )
        for name, compiled, dtype in (
            ("eager", False, "fp32"),
            ("compiled", True, "fp32"),
            ("bf16_eager", False, "bf16"),
            ("bf16_compiled", True, "bf16"),
        )
    }
    variants = {
        name: (lambda seed, s=sampler: run_native(s, prompts, args, seed))
        for name, sampler in samplers.items()
    }
    stop_ids = tokenizer.stop_token_ids
    variants["transformers_generate"] = lambda seed: run_transformers(
        hf_model, prompts, tokenizer.pad_id, stop_ids, args, seed
    )
    for fn in variants.values():  # warm-up (the compiled graphs exist already)
        fn(args.seed)
    results = time_variants(variants, args.repeats, args.seed, "bench_rollout")
    rate = {name: r["tokens_per_s_median"] for name, r in results.items()}
    seconds = {name: r["seconds_median"] for name, r in results.items()}
    saved = seconds["native_eager"] - seconds["native_compiled"]
    report = {
        **report_header("bench_rollout", args, prompts),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "transformers_version": transformers.__version__,
        "compile": compile_s,
        "compiled_over_eager": rate["native_compiled"] / rate["native_eager"],
        "bf16_over_fp32_eager": rate["native_bf16_eager"] / rate["native_eager"],
        **{
            f"{name.removeprefix('native_')}_over_transformers": rate[name]
            / rate["transformers_generate"]
            for name in samplers
        },
        # GRPO steps (one such rollout each) after which the first compile has paid for itself.
        "compile_paid_back_after_rollouts": compile_s["first_s"] / saved if saved > 0 else None,
        "results": results,
    }
    if args.profile:
        report["profile_compiled"] = profile_compiled(samplers["native_compiled"], prompts, args)
    write_report(report, args.json)


if __name__ == "__main__":
    main()
