"""Rollout throughput: native sampler against in-process vLLM on SmolLM2-135M, one run.

    python tools/bench_rollout_vllm.py --json outputs/bench_rollout_vllm.json

Needs vLLM (``./setup.sh --vllm``; run it with that venv's python). Generates the GRPO CPU
demo's rollout, 4 short arithmetic chat prompts (the same ones as tools/bench_rollout.py) x 8
samples x 64 new tokens at temperature 1, with the native KV-cache sampler (all sequences in
one batch) and with ``VLLMSampler``, interleaved ``--repeats`` times. The JSON holds per-engine
medians of generated tokens per second (stop tokens included, as in training), their ratio,
and vLLM's start-up time, which is paid once per run and so is reported apart.
"""

import argparse
from pathlib import Path

import torch
from bench_rollout import (  # tools/ is on sys.path when run as a script
    arithmetic_prompts,
    report_header,
    time_variants,
    write_report,
)

from packrl.models import ChatTokenizer, ensure_smollm2_checkpoint, load_smollm2
from packrl.rollout import NativeSampler
from packrl.rollout.vllm_engine import VLLMSampler


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
    args = parser.parse_args()
    # Before vLLM starts: its CPU worker keeps the thread count it finds.
    torch.set_num_threads(args.threads)

    checkpoint = ensure_smollm2_checkpoint()
    tokenizer = ChatTokenizer.from_dir(checkpoint)
    prompts = arithmetic_prompts(tokenizer, args.prompts, args.seed)
    max_len = max(map(len, prompts)) + args.new_tokens
    native = NativeSampler(
        load_smollm2(checkpoint),
        stop_token_ids=tokenizer.stop_token_ids,
        pad_id=tokenizer.pad_id,
        max_batch_size=args.prompts * args.samples,
    )
    vllm_sampler = VLLMSampler(
        native.model,
        stop_token_ids=tokenizer.stop_token_ids,
        checkpoint_dir=checkpoint,
        max_model_len=max_len,
        seed=args.seed,
    )
    import vllm  # VLLMSampler has imported it (or raised how to install it)

    samplers = {"native": native, "vllm": vllm_sampler}
    for sampler in samplers.values():  # warm-up
        sampler.generate(prompts[:1], max_new_tokens=4, seed=0)

    def run(sampler):
        def fn(seed: int) -> int:
            out = sampler.generate(
                prompts,
                num_samples=args.samples,
                max_new_tokens=args.new_tokens,
                temperature=args.temperature,
                seed=seed,
            )
            return sum(len(c.token_ids) for s in out for c in s)

        return fn

    results = time_variants(
        {name: run(sampler) for name, sampler in samplers.items()},
        args.repeats,
        args.seed,
        "bench_rollout_vllm",
    )
    report = report_header("bench_rollout_vllm", args, prompts)
    report.update(
        vllm_version=vllm.__version__,
        vllm_startup_s=vllm_sampler.startup_seconds,
        vllm_over_native=results["vllm"]["tokens_per_s_median"]
        / results["native"]["tokens_per_s_median"],
        results=results,
    )
    write_report(report, args.json)


if __name__ == "__main__":
    main()
