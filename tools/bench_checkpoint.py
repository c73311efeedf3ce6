"""Time checkpoint saves and loads of the offline SmolLM2-135M (full and LoRA); prints JSON.

Also what the per-file checksums cost: after each save, the SHA-256 pass that save_checkpoint
runs over the step dir is timed again, interleaved with a BLAKE2b pass over the same files
(the alternative hash), and reported as a share of the save's time. On Linux, also how far
each save raises the process's resident memory above what it held before the save
(``save_rss_rise_gb``: the kernel's peak-RSS counter is reset through /proc/self/clear_refs
before each save and read after it).

python tools/bench_checkpoint.py [--threads 2] [--repeats 2]
"""

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from packrl.checkpointing import load_checkpoint, save_checkpoint
from packrl.checkpointing.manifest import read_manifest, verify_files
from packrl.models import ensure_smollm2_checkpoint, load_smollm2


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hash_dir(step_dir: Path, algo: str) -> None:
    for f in sorted(step_dir.iterdir()):
        with open(f, "rb") as fh:
            hashlib.file_digest(fh, algo)


def rss_gb(field: str) -> float | None:
    """VmRSS or VmHWM of this process in GB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith(field)) / 1e6
    except OSError:
        return None


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=2, help="saves per variant (median)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    src = ensure_smollm2_checkpoint()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        full = load_smollm2(src)
        opt = torch.optim.AdamW(full.parameters(), lr=1e-5)
        for p in full.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # materialise AdamW state, as in a real run
        lora = load_smollm2(src, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
        variants = {
            "full+adamw": dict(model=full, optimizer=opt),
            "lora_merged": dict(model=lora),
            "lora_adapter_only": dict(model=lora, adapter_only=True),
        }
        result = {"threads": args.threads, "repeats": args.repeats, "cpu_count": os.cpu_count()}
        for name, kw in variants.items():
            times: dict[str, list[float]] = {"save": [], "sha256": [], "blake2b": []}
            rises: list[float] = []
            for i in range(args.repeats):
                reset_peak_rss()
                before = rss_gb("VmRSS")
                start = time.perf_counter()
                step_dir = save_checkpoint(tmp / name, i, source_checkpoint_dir=src, **kw)
                times["save"].append(time.perf_counter() - start)
                if before is not None:
                    rises.append(rss_gb("VmHWM") - before)
                # alternate the order so that neither hash always reads a colder page cache
                for algo in ("sha256", "blake2b")[:: 1 if i % 2 == 0 else -1]:
                    start = time.perf_counter()
                    hash_dir(step_dir, algo)
                    times[algo].append(time.perf_counter() - start)
            save_s, sha_s = median(times["save"]), median(times["sha256"])
            result[name] = {
                "save_s_median": save_s,
                "size_mb": dir_mb(step_dir),
                "sha256_s_median": sha_s,
                "blake2b_s_median": median(times["blake2b"]),
                "sha256_share_of_save": round(sha_s / save_s, 3),
                "save_rss_rise_gb": round(median(rises), 3) if rises else None,
            }
        result["full+adamw"]["load_s"] = timed(
            lambda: load_checkpoint(tmp / "full+adamw", model=full, optimizer=opt)
        )  # includes verifying the checksums, timed alone next
        last = tmp / "full+adamw" / f"step_{args.repeats - 1}"
        result["full+adamw"]["load_verify_s"] = timed(
            lambda: verify_files(last, read_manifest(last))
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
