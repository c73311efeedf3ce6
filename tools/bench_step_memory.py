"""Resident memory of the CPU demo's GRPO steps, by phase, with and without heap trimming.

Runs the demo config for ``--steps`` steps (no evaluation, no checkpoint saves) once per
variant, each in its own process so no variant inherits another's heap:

    trim      the recipe as shipped: glibc's free heap pages are handed back before each
              micro-batch (``packrl.training.memory.release_freed_host_memory``)
    no_trim   the same run with that call replaced by a no-op

A thread samples resident memory (/proc/self/statm) every 5 ms and keeps, per step, the
peak of each phase: generation, forward (policy logprobs), backward, optimizer step, weight
sync. At each phase's peak it also reads glibc's ``mallinfo2``: heap bytes in use, heap bytes
free but still held, and mmapped bytes. The runs are deterministic for a seed (same rollouts
and updates in both variants), so only the allocator differs. Linux with glibc only.

    python tools/bench_step_memory.py --seed 2 --steps 6 --json OUT [overrides ...]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("trim", "no_trim")
GIB = 2**30


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        ).split()
    ]


def _heap(libc) -> dict[str, float]:
    info = libc.mallinfo2()
    return {
        "heap_in_use_gib": info.uordblks / GIB,
        "heap_free_held_gib": info.fordblks / GIB,
        "mmapped_gib": info.hblkhd / GIB,
    }


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def run_variant(variant: str, seed: int, steps: int, threads: int, overrides: list[str]) -> dict:
    """One run in this process: per step and phase, peak RSS and the heap at that peak."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    import recipes.grpo as grpo

    torch.set_num_threads(threads)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    if variant == "no_trim":
        grpo.release_freed_host_memory = lambda: False

    phase, step = ["setup"], [0]
    peaks: dict[tuple[int, str], dict] = {}

    def sample() -> None:
        while True:
            rss, key = _rss_gib(), (step[0], phase[0])
            if rss > peaks.get(key, {}).get("rss_gib", 0.0) + 0.005:
                peaks[key] = {"rss_gib": rss, **_heap(libc)}
            time.sleep(0.005)

    def in_phase(name: str, fn, then: str | None = None):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            previous, phase[0] = phase[0], name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = then or previous

        return wrapped

    threading.Thread(target=sample, daemon=True).start()
    # the forward returns into loss and backward: tag what follows it "backward"
    grpo.packed_logprobs = in_phase("forward", grpo.packed_logprobs, then="backward")
    cfg = OmegaConf.load(ROOT / "tune_configs/smollm2_135m_arithmetic_full_cpu.yaml")
    out_dir = tempfile.mkdtemp(prefix="packrl-stepmem-")
    for key, value in {
        "seed": seed,
        "max_steps": steps,
        "output_dir": out_dir,
        "save_every_n_steps": None,
        "eval.at_start": False,
        "eval.every_n_steps": None,
        "plot": False,
    }.items():
        OmegaConf.update(cfg, key, value)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    recipe = grpo.GRPORecipe(cfg)
    recipe.setup()
    recipe.sampler.generate = in_phase("generation", recipe.sampler.generate)
    recipe.sampler.sync_weights = in_phase("sync", recipe.sampler.sync_weights)
    recipe.optimizer.step = in_phase("optimizer", recipe.optimizer.step)
    train_step = recipe.train_step

    def counted_step():
        step[0] += 1
        phase[0] = "other"
        return train_step()

    recipe.train_step = counted_step
    recipe.save_checkpoint = in_phase("final_save", recipe.save_checkpoint)
    recipe.train()
    time.sleep(0.05)
    recipe.cleanup()
    shutil.rmtree(out_dir)  # the final checkpoint (1.6 GB) is not needed
    per_step: dict[int, dict] = {}
    for (s, name), values in sorted(peaks.items()):
        per_step.setdefault(s, {})[name] = {k: round(v, 3) for k, v in values.items()}
    peak = max(v["rss_gib"] for v in peaks.values())
    return {"variant": variant, "peak_rss_gib": round(peak, 3), "per_step": per_step}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="where to write the results (also printed)")
    p.add_argument("--only", choices=VARIANTS, help="run one variant here (used by the parent)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.only:
        result = run_variant(args.only, args.seed, args.steps, args.threads, args.overrides)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--only", variant, "--seed", str(args.seed)]
        cmd += ["--steps", str(args.steps), "--threads", str(args.threads), *args.overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
        print(f"{variant}: peak {results[-1]['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    report = {
        "benchmark": "step_memory",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seed": args.seed,
        "steps": args.steps,
        "threads": args.threads,
        "overrides": args.overrides,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "peak_rss_gib": {r["variant"]: r["peak_rss_gib"] for r in results},
        "runs": results,
    }
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
