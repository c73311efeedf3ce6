"""Benchmark: one GRPO batch on SmolLM2 (CPU, fp32), forward+backward, four layouts.

    (a) padded    one row per completion, prompt repeated, rows padded to the longest
                  (a padded GRPO trainer; causal SDPA, no mask)
    (b) unshared  packed rows, every completion with its own copy of the prompt (BlockMask)
    (c) block     packed rows, prompt shared by its completions, BlockMask
    (d) dense     same rows as (c), dense boolean mask

All four compute logprobs of the same completion tokens with the same chunked projection,
so they differ only in layout and attention. Layouts are interleaved (order rotated each
repeat); medians are reported. A second part times (c) vs (d) on 4096-token rows and
reports mask memory.

Peak memory is measured apart from the timing, and before it: each layout runs one step in its
own fresh process (this script with --only-layout NAME), so memory that glibc kept from an
earlier layout cannot hide a later one, while the parent holds no model or batch yet (so the
padded layout's ~18 GB child fits a 24 GB machine). The child loads the model, builds its batch, resets the
kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs), runs the step and reads the
peak back (VmHWM): "peak_rss_mb" is the step's peak RSS, "step_mb" that peak minus the RSS
just before the step (model and batch loaded; no optimizer state).

    python tools/bench_packing.py --json bench_packing.json [--quick]
    python tools/bench_packing.py --only-layout c_shared_block   # memory of one layout
    python tools/bench_packing.py --profile a_padded c_shared_block --json OUT  # where the time goes
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from packrl.packed.attention import (
    block_mask_nbytes,
    packed_block_mask,
    packed_dense_mask,
    use_packed_attention,
)
from packrl.packed.logprobs import chunked_token_logprobs, final_hidden_states, packed_logprobs
from packrl.packed.packing import PackedBatch, pack_groups
from packrl.rollout import Completion
from packrl.rollout.group import GroupRollout

ROW_ALIGN = 128  # packed rows are sized to the batch, rounded up to whole mask blocks
LAYOUTS = ("a_padded", "b_unshared_block", "c_shared_block", "d_shared_dense")
LAYOUTS_4K = ("c_block", "d_dense")


def make_groups(n_groups, G, prompt_len, lo, hi, vocab, seed) -> list[GroupRollout]:
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        lens = [rng.randint(lo, hi) for _ in range(G)]
        groups.append(
            GroupRollout(
                prompt_ids=[rng.randrange(vocab) for _ in range(prompt_len)],
                completions=[
                    Completion([rng.randrange(vocab) for _ in range(n)], [-1.0] * n, True)
                    for n in lens
                ],
                advantages=[rng.uniform(-1, 1) for _ in lens],
                loss_weights=[1.0 / n for n in lens],
            )
        )
    return groups


def unshared(groups: list[GroupRollout]) -> list[GroupRollout]:
    """Every completion as its own group: packing without prompt sharing."""
    return [
        GroupRollout(g.prompt_ids, [c], advantages=[a], loss_weights=[w])
        for g in groups
        for c, a, w in zip(g.completions, g.advantages, g.loss_weights, strict=True)
    ]


def padded_rows(groups: list[GroupRollout]) -> PackedBatch:
    """(a): one row per completion, padded to the longest prompt+completion."""
    seqs = unshared(groups)
    longest = max(len(s.prompt_ids) + s.lengths[0] for s in seqs)
    rows = [pack_groups([s], longest) for s in seqs]
    fields = {k: torch.cat([getattr(r, k) for r in rows]) for k in ("tokens", "positions", "group_ids", "parent_ids", "trained", "pred_pos", "behaviour_logprobs", "advantages", "loss_weights")}  # fmt: skip
    fields["seq_ids"] = torch.cat([torch.where(r.trained, i, -1) for i, r in enumerate(rows)])
    batch = PackedBatch(**fields, stats=None)
    batch.stats = batch.select_rows(range(len(rows))).stats
    return batch


def row_len_for(groups: list[GroupRollout]) -> int:
    """Smallest block-aligned row that holds the largest group whole."""
    need = max(len(g.prompt_ids) + sum(g.lengths) for g in groups)
    return -(-need // ROW_ALIGN) * ROW_ALIGN


def padded_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """(a): causal attention without a mask, as a padded trainer runs it."""
    hidden, output = final_hidden_states(model, batch.tokens, batch.positions, None)
    rows, cols = batch.trained.nonzero(as_tuple=True)
    lp, _ = chunked_token_logprobs(
        output, hidden[rows, batch.pred_pos[rows, cols]], batch.tokens[rows, cols]
    )
    return torch.zeros(batch.tokens.shape).index_put((rows, cols), lp)


def train_step(model, batch: PackedBatch, kind: str) -> None:
    model.zero_grad(set_to_none=True)
    if kind == "padded":
        lp = padded_logprobs(model, batch)
    else:  # the mask is built inside the step: it is part of the cost
        if kind == "dense":
            mask = packed_dense_mask(batch.group_ids, batch.parent_ids)
        else:
            mask = packed_block_mask(batch.group_ids, batch.parent_ids)
        lp, _ = packed_logprobs(model, batch, mask=mask)
    loss = (batch.advantages * batch.loss_weights * lp).sum()
    loss.backward()


def time_layouts(model, layouts: dict[str, tuple[PackedBatch, str]], repeats: int, desc: str):
    """Interleaved runs (order rotated each repeat, so a first-run cost does not always hit
    the same layout) -> per layout lists of wall/cpu seconds."""
    names = list(layouts)
    res = {n: {"wall_s": [], "cpu_s": []} for n in names}
    runs = [
        (rep, names[(rep + i) % len(names)]) for rep in range(repeats) for i in range(len(names))
    ]
    for _, n in tqdm(runs, desc=desc):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(model, *layouts[n])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        res[n]["wall_s"].append(round(wall, 3))
        res[n]["cpu_s"].append(round(cpu, 3))
    for n in names:
        r = res[n]
        r["wall_s_median"] = statistics.median(r["wall_s"])
        r["cpu_s_median"] = statistics.median(r["cpu_s"])
    return res


def proc_status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def measure_step_memory(model, batch: PackedBatch, kind: str) -> dict:
    """Peak RSS of one step in this (fresh) process: reset the kernel's peak counter, step,
    read it back. The load peak (before the reset) is kept for reference."""
    gc.collect()
    load_peak = proc_status_mb("VmHWM")
    before = proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    train_step(model, batch, kind)
    peak = proc_status_mb("VmHWM")
    return {
        "peak_rss_mb": peak,
        "rss_before_step_mb": before,
        "step_mb": round(peak - before, 1),
        "load_peak_rss_mb": load_peak,
    }


ATTENTION_OPS = ("flash_attention", "scaled_dot_product")  # forward and backward kernels
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def profile_step(model, batch: PackedBatch, kind: str, top: int = 12) -> dict:
    """One step of a layout under torch.profiler, after one unprofiled warm-up step.

    Returns the step's wall seconds, the ops' summed self CPU seconds, the shares of it spent
    in attention kernels and in matmuls, and the ``top`` ops by self CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    train_step(model, batch, kind)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        train_step(model, batch, kind)
        wall = time.perf_counter() - t0
    ops = sorted(
        ((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda o: -o[1]
    )
    total = sum(sec for _, sec in ops)

    def share(pick) -> float:
        return round(sum(sec for name, sec in ops if pick(name)) / total, 3)

    return {
        "wall_s": round(wall, 3),
        "self_cpu_s": round(total, 3),
        "attention_share": share(lambda n: any(a in n for a in ATTENTION_OPS)),
        "matmul_share": share(lambda n: n in MATMUL_OPS),
        "top_ops": [{"op": name, "self_cpu_s": round(sec, 3)} for name, sec in ops[:top]],
    }


def memory_in_subprocess(name: str, args) -> dict:
    """Run this script with --only-layout NAME in a fresh process; its last stdout line is JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only-layout", name]
    cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--quick"] if args.quick else []
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def build_layouts(args, vocab: int) -> tuple[dict, dict, dict]:
    """The batches of both parts, the same in the parent and in every --only-layout child
    (seeded). -> (shape, part-1 layouts, part-2 layouts); layouts map name -> (batch, kind)."""
    if args.quick:  # a smoke run: small shapes
        shape = dict(G=8, prompt_len=32, lo=4, hi=16, rows4k=256)
    else:
        shape = dict(G=8, prompt_len=1000, lo=50, hi=400, rows4k=4096)
    G, P, lo, hi, rows4k = shape.values()
    # Part 1: one GRPO group (G completions of one prompt), four layouts.
    groups = make_groups(1, G, P, lo, hi, vocab, args.seed)
    shape["completion_lens"] = groups[0].lengths
    row_len = row_len_for(groups)
    layouts = {
        "a_padded": (padded_rows(groups), "padded"),
        "b_unshared_block": (pack_groups(unshared(groups), row_len), "block"),
        "c_shared_block": (pack_groups(groups, row_len), "block"),
        "d_shared_dense": (pack_groups(groups, row_len), "dense"),
    }
    # Part 2: (c) vs (d) on rows of rows4k tokens, several groups per batch.
    batch4k = pack_groups(make_groups(2, G, P, lo, hi, vocab, args.seed + 1), rows4k)
    layouts4k = {"c_block": (batch4k, "block"), "d_dense": (batch4k, "dense")}
    return shape, layouts, layouts4k


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_info(args) -> dict:
    """What every JSON report of this script starts with: the command, torch and threads."""
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__,
        "threads": args.threads,
    }


def write_json(out: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(out, indent=2) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: prompt 32, completions 4-16, 1 repeat, 256-token rows in part 2",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--only-layout",
        choices=[*LAYOUTS, *(f"rows4k_{n}" for n in LAYOUTS_4K)],
        help="measure peak memory of one step of this layout in this process, print one JSON "
        "line and exit (the benchmark runs itself this way once per layout)",
    )
    p.add_argument(
        "--profile",
        nargs="+",
        choices=LAYOUTS,
        help="profile one step of each of these layouts instead (attention and matmul shares, "
        "top ops), print JSON and exit",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from packrl.models import ensure_smollm2_checkpoint, load_smollm2

    if not (args.only_layout or args.profile):
        # Memory first, one fresh process per layout, while this process holds no model or
        # batch: the padded layout's child needs ~18 GB, and a parent that had already run
        # the timing kept ~13 GB, more than a 24 GB machine holds together.
        parent_rss_mb = proc_status_mb("VmRSS")
        memory = {
            name: memory_in_subprocess(name, args)
            for name in tqdm(LAYOUTS, desc="memory, one process per layout")
        }
        memory4k = {
            name: memory_in_subprocess(f"rows4k_{name}", args)
            for name in tqdm(LAYOUTS_4K, desc="memory, 4096-token rows")
        }
    model = use_packed_attention(load_smollm2(ensure_smollm2_checkpoint()))
    vocab = model.tok_embeddings.num_embeddings
    shape, layouts, layouts4k = build_layouts(args, vocab)
    if args.only_layout:
        name = args.only_layout
        batch, kind = layouts4k[name[7:]] if name.startswith("rows4k_") else layouts[name]
        print(json.dumps({"layout": name, **measure_step_memory(model, batch, kind)}))
        return {}
    if args.profile:
        out = {
            **run_info(args),
            "started_utc": utc_now(),
            "batch": {"G": shape["G"], "prompt_len": shape["prompt_len"]},
            "profiles": {n: profile_step(model, *layouts[n]) for n in tqdm(args.profile)},
            "loadavg_at_end": os.getloadavg(),
        }
        print(json.dumps(out, indent=1))
        write_json(out, args.json)
        return out
    repeats = args.repeats or (1 if args.quick else 3)
    G, P, rows4k, lens = shape["G"], shape["prompt_len"], shape["rows4k"], shape["completion_lens"]

    res = time_layouts(model, layouts, repeats, "layouts")
    base_wall, base_cpu = res["a_padded"]["wall_s_median"], res["a_padded"]["cpu_s_median"]
    for name, (batch, _) in layouts.items():
        res[name]["rows"], res[name]["row_len"] = batch.num_rows, batch.row_len
        res[name]["positions"] = batch.num_rows * batch.row_len
        res[name]["speedup_vs_a"] = round(base_wall / res[name]["wall_s_median"], 2)
        res[name]["cpu_speedup_vs_a"] = round(base_cpu / res[name]["cpu_s_median"], 2)
    ideal = res["a_padded"]["positions"] / res["c_shared_block"]["positions"]

    batch4k = layouts4k["c_block"][0]
    res4k = time_layouts(model, layouts4k, repeats, f"{rows4k}-token rows")
    bm = packed_block_mask(batch4k.group_ids, batch4k.parent_ids)
    dense = packed_dense_mask(batch4k.group_ids, batch4k.parent_ids)
    kept = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    n_blocks = batch4k.num_rows * (-(-rows4k // ROW_ALIGN)) ** 2
    masks = {
        "block_mask_bytes": block_mask_nbytes(bm),
        "dense_mask_bytes": block_mask_nbytes(dense),
        "blocks_kept": kept,
        "blocks_total": n_blocks,
        "causal_blocks": batch4k.num_rows * (n := -(-rows4k // ROW_ALIGN)) * (n + 1) // 2,
    }

    for name in layouts:
        res[name]["memory"] = memory[name]
    for name in layouts4k:
        res4k[name]["memory"] = memory4k[name]

    out = {
        **run_info(args),
        "date_utc": utc_now(),
        "loadavg_at_end": os.getloadavg(),
        "memory_measure": "one fresh process per layout: peak RSS (VmHWM, reset via "
        "/proc/self/clear_refs after model load) over one step; step_mb = peak - RSS before",
        "parent_rss_mb_during_memory_phase": parent_rss_mb,
        "batch": {"G": G, "prompt_len": P, "completion_lens": lens, "trained_tokens": sum(lens)},
        "layouts": res,
        "ideal_ratio_positions_a_over_c": round(ideal, 2),
        "c_speedup_fraction_of_ideal": round(res["c_shared_block"]["speedup_vs_a"] / ideal, 2),
        "rows_4k": {
            "row_len": rows4k,
            "rows": batch4k.num_rows,
            "stats": asdict(batch4k.stats),
            "timing": res4k,
            "c_over_d_wall": round(
                res4k["c_block"]["wall_s_median"] / res4k["d_dense"]["wall_s_median"], 2
            ),
            "masks": masks,
        },
    }
    print(f"batch: G={G}, prompt {P}, completions {lens}")
    print(
        f"{'layout':<18}{'rows x len':>12}{'positions':>11}{'wall s':>9}{'cpu s':>8}{'peak MB':>9}{'step MB':>9}{'x vs a':>8}{'cpu x':>7}"
    )
    for name, r in res.items():
        m = r["memory"]
        print(
            f"{name:<18}{r['rows']:>5} x {r['row_len']:<5}{r['positions']:>10}{r['wall_s_median']:>9.2f}{r['cpu_s_median']:>8.2f}{m['peak_rss_mb']:>9.0f}{m['step_mb']:>9.0f}{r['speedup_vs_a']:>8.2f}{r['cpu_speedup_vs_a']:>7.2f}"
        )
    print(
        f"ideal ratio (positions a / c): {ideal:.2f}; (c) reaches {out['c_speedup_fraction_of_ideal']:.0%} of it"
    )
    r4 = out["rows_4k"]
    mc, md = res4k["c_block"]["memory"], res4k["d_dense"]["memory"]
    print(
        f"{rows4k}-token rows ({batch4k.num_rows} rows): block {res4k['c_block']['wall_s_median']:.2f} s, dense {res4k['d_dense']['wall_s_median']:.2f} s (c/d = {r4['c_over_d_wall']}); peak RSS block {mc['peak_rss_mb']:.0f} MB (step {mc['step_mb']:.0f}), dense {md['peak_rss_mb']:.0f} MB (step {md['step_mb']:.0f})"
    )
    print(
        f"mask memory: BlockMask {masks['block_mask_bytes'] / 2**10:.1f} KiB vs dense {masks['dense_mask_bytes'] / 2**20:.1f} MiB; blocks kept {kept}/{n_blocks}"
    )
    write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
