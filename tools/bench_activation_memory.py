"""Activation memory of one SmolLM2 forward + backward, with and without activation
checkpointing, against packrl.training.memory.activation_bytes' estimate.

    python tools/bench_activation_memory.py --tokens 1024 --json act.json

Each variant runs in its own process (peak RSS is per process): the peak RSS of one forward
and backward over `--tokens` random tokens, minus the RSS after loading the model. The
difference between the two variants is what checkpointing saves; it is compared with the
estimate the recipe's `enable_activation_checkpointing: auto` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def one(checkpointing: bool, tokens: int, threads: int) -> dict:
    import torch
    from torchtune import modules, training

    from packrl.models import ensure_smollm2_checkpoint, load_smollm2

    torch.set_num_threads(threads)
    model = load_smollm2(ensure_smollm2_checkpoint())
    if checkpointing:
        training.set_activation_checkpointing(
            model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
        )
    base = _gib()
    x = torch.randint(0, 49152, (1, tokens))
    t = time.perf_counter()
    model(x).float().logsumexp(-1).mean().backward()
    return {"checkpointing": checkpointing, "base_gib": base, "peak_gib": _gib(),
            "delta_gib": _gib() - base, "seconds": time.perf_counter() - t}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    p.add_argument("--only", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print(json.dumps(one(args.only == "on", args.tokens, args.threads)))
        return
    runs = {}
    for variant in ("off", "on"):
        cmd = [sys.executable, __file__, "--only", variant, "--tokens", str(args.tokens),
               "--threads", str(args.threads), "--json", "-"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs[variant] = json.loads(out.strip().splitlines()[-1])

    import torch

    from packrl.models import ensure_smollm2_checkpoint, load_smollm2
    from packrl.training.memory import activation_bytes

    model = load_smollm2(ensure_smollm2_checkpoint())
    estimate = activation_bytes(model, args.tokens, torch.float32) / 1024**3
    result = {
        "benchmark": "activation_memory",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tokens": args.tokens,
        "threads": args.threads,
        "loadavg_1m": os.getloadavg()[0],
        "runs": runs,
        "saved_by_checkpointing_gib": runs["off"]["delta_gib"] - runs["on"]["delta_gib"],
        "estimate_gib": estimate,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
