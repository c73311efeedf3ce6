"""Time checkpoint saves and loads of the offline SmolLM2-135M (full and LoRA); prints JSON.

python tools/bench_checkpoint.py [--threads 2] [--repeats 2]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from packrl.checkpointing import load_checkpoint, save_checkpoint
from packrl.models import ensure_smollm2_checkpoint, load_smollm2


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
            times = [
                timed(
                    lambda d=tmp / name, kw=kw, i=i: save_checkpoint(
                        d, i, source_checkpoint_dir=src, **kw
                    )
                )
                for i in range(args.repeats)
            ]
            result[name] = {
                "save_s_median": sorted(times)[len(times) // 2],
                "size_mb": dir_mb(tmp / name / f"step_{args.repeats - 1}"),
            }
        result["full+adamw"]["load_s"] = timed(
            lambda: load_checkpoint(tmp / "full+adamw", model=full, optimizer=opt)
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
