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

Peak memory is the peak resident set size (RSS, sampled every 2 ms from /proc/self/statm)
during a step minus the RSS just before it. Large tensors are mmap-backed and go back to the
OS when freed, but glibc may keep smaller freed blocks, so this can under-report a step that
follows a bigger one. (Forcing every allocation through mmap made steps 10x slower.)

    python tools/bench_packing.py --json bench_packing.json [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from packrl.attention import (
    block_mask_nbytes,
    packed_block_mask,
    packed_dense_mask,
    use_packed_attention,
)
from packrl.logprobs import chunked_token_logprobs, final_hidden_states, packed_logprobs
from packrl.packing import GroupRollout, PackedBatch, pack_groups

ROW_ALIGN = 128  # packed rows are sized to the batch, rounded up to whole mask blocks


class PeakRSS:
    """Peak RSS increase (bytes) over the body of a ``with`` block, sampled in a thread."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta = self.peak - self.start


def make_groups(n_groups, G, prompt_len, lo, hi, vocab, seed) -> list[GroupRollout]:
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        lens = [rng.randint(lo, hi) for _ in range(G)]
        groups.append(
            GroupRollout(
                prompt_ids=[rng.randrange(vocab) for _ in range(prompt_len)],
                completion_ids=[[rng.randrange(vocab) for _ in range(n)] for n in lens],
                behaviour_logprobs=[[-1.0] * n for n in lens],
                advantages=[rng.uniform(-1, 1) for _ in lens],
                loss_weights=[1.0 / n for n in lens],
            )
        )
    return groups


def unshared(groups: list[GroupRollout]) -> list[GroupRollout]:
    """Every completion as its own group: packing without prompt sharing."""
    return [
        GroupRollout(g.prompt_ids, [c], [b], [a], [w])
        for g in groups
        for c, b, a, w in zip(
            g.completion_ids, g.behaviour_logprobs, g.advantages, g.loss_weights, strict=True
        )
    ]


def padded_rows(groups: list[GroupRollout]) -> PackedBatch:
    """(a): one row per completion, padded to the longest prompt+completion."""
    seqs = unshared(groups)
    longest = max(len(s.prompt_ids) + len(s.completion_ids[0]) for s in seqs)
    rows = [pack_groups([s], longest) for s in seqs]
    fields = {k: torch.cat([getattr(r, k) for r in rows]) for k in ("tokens", "positions", "group_ids", "parent_ids", "trained", "pred_pos", "behaviour_logprobs", "advantages", "loss_weights")}  # fmt: skip
    fields["seq_ids"] = torch.cat([torch.where(r.trained, i, -1) for i, r in enumerate(rows)])
    batch = PackedBatch(**fields, stats=None)
    batch.stats = batch.select_rows(range(len(rows))).stats
    return batch


def row_len_for(groups: list[GroupRollout]) -> int:
    """Smallest block-aligned row that holds the largest group whole."""
    need = max(len(g.prompt_ids) + sum(map(len, g.completion_ids)) for g in groups)
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
    the same layout) -> per layout lists of wall/cpu/rss."""
    names = list(layouts)
    res = {n: {"wall_s": [], "cpu_s": [], "peak_rss_delta_mb": []} for n in names}
    runs = [
        (rep, names[(rep + i) % len(names)]) for rep in range(repeats) for i in range(len(names))
    ]
    for _, n in tqdm(runs, desc=desc):
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(model, *layouts[n])
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        res[n]["wall_s"].append(round(wall, 3))
        res[n]["cpu_s"].append(round(cpu, 3))
        res[n]["peak_rss_delta_mb"].append(round(mem.delta / 2**20, 1))
    for n in names:
        r = res[n]
        r["wall_s_median"] = statistics.median(r["wall_s"])
        r["cpu_s_median"] = statistics.median(r["cpu_s"])
        r["peak_rss_delta_mb_max"] = max(r["peak_rss_delta_mb"])
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small batch (prompt 128, completions 8-48), 1 repeat, 512-token rows",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per layout")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from packrl.models import ensure_smollm2_checkpoint, load_smollm2

    model = use_packed_attention(load_smollm2(ensure_smollm2_checkpoint()))
    vocab = model.tok_embeddings.num_embeddings
    if args.quick:
        G, P, lo, hi, repeats, rows4k = 8, 128, 8, 48, args.repeats or 1, 512
    else:
        G, P, lo, hi, repeats, rows4k = 8, 1000, 50, 400, args.repeats or 3, 4096

    # Part 1: one GRPO group (G completions of one prompt), four layouts.
    groups = make_groups(1, G, P, lo, hi, vocab, args.seed)
    row_len = row_len_for(groups)
    layouts = {
        "a_padded": (padded_rows(groups), "padded"),
        "b_unshared_block": (pack_groups(unshared(groups), row_len), "block"),
        "c_shared_block": (pack_groups(groups, row_len), "block"),
        "d_shared_dense": (pack_groups(groups, row_len), "dense"),
    }
    res = time_layouts(model, layouts, repeats, "layouts")
    base_wall, base_cpu = res["a_padded"]["wall_s_median"], res["a_padded"]["cpu_s_median"]
    for name, (batch, _) in layouts.items():
        res[name]["rows"], res[name]["row_len"] = batch.num_rows, batch.row_len
        res[name]["positions"] = batch.num_rows * batch.row_len
        res[name]["speedup_vs_a"] = round(base_wall / res[name]["wall_s_median"], 2)
        res[name]["cpu_speedup_vs_a"] = round(base_cpu / res[name]["cpu_s_median"], 2)
    ideal = res["a_padded"]["positions"] / res["c_shared_block"]["positions"]
    lens = [len(c) for c in groups[0].completion_ids]

    # Part 2: (c) vs (d) on rows of rows4k tokens, several groups per batch.
    groups4k = make_groups(2, G, P, lo, hi, vocab, args.seed + 1)
    batch4k = pack_groups(groups4k, rows4k)
    res4k = time_layouts(
        model,
        {"c_block": (batch4k, "block"), "d_dense": (batch4k, "dense")},
        repeats,
        f"{rows4k}-token rows",
    )
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

    out = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": args.threads,
        "loadavg_at_end": os.getloadavg(),
        "memory_measure": "peak RSS during the step minus RSS before it (sampled every 2 ms, in-process)",
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
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
        f"{'layout':<18}{'rows x len':>12}{'positions':>11}{'wall s':>9}{'cpu s':>8}{'peak MB':>9}{'x vs a':>8}{'cpu x':>7}"
    )
    for name, r in res.items():
        print(
            f"{name:<18}{r['rows']:>5} x {r['row_len']:<5}{r['positions']:>10}{r['wall_s_median']:>9.2f}{r['cpu_s_median']:>8.2f}{r['peak_rss_delta_mb_max']:>9.0f}{r['speedup_vs_a']:>8.2f}{r['cpu_speedup_vs_a']:>7.2f}"
        )
    print(
        f"ideal ratio (positions a / c): {ideal:.2f}; (c) reaches {out['c_speedup_fraction_of_ideal']:.0%} of it"
    )
    r4 = out["rows_4k"]
    print(
        f"{rows4k}-token rows ({batch4k.num_rows} rows): block {res4k['c_block']['wall_s_median']:.2f} s, dense {res4k['d_dense']['wall_s_median']:.2f} s (c/d = {r4['c_over_d_wall']})"
    )
    print(
        f"mask memory: BlockMask {masks['block_mask_bytes'] / 2**10:.1f} KiB vs dense {masks['dense_mask_bytes'] / 2**20:.1f} MiB; blocks kept {kept}/{n_blocks}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
