"""Benchmark: extraction with attention statistics vs without, same batches (not a test).

Mid-size random Qwen2.5-VL on CPU (hidden 512, 8 layers, 8 heads, 4 KV heads; the model of
bench/extract_overhead.py), generated data. Both runs do the whole per-batch extraction work — hooked
forward, key gather, Zarr writes — and the second also hooks q_proj and computes the attention table
(``kscale.attention.stats.batch_stats``). Prints the time of each and their ratio (goal <= 1.15 on CPU for
the default query selection, ``after_image``), plus ``last_k``. The writer buffers the attention table and
writes it once per shard at commit (written per batch it cost 1.41x: see docs/attention.md).

    python bench/attention_overhead.py [--samples 32] [--batch 4] [--repeats 5] [--image-size 224]
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from extract_overhead import bench_args, bench_setup  # noqa: E402  (one benchmark set-up for both overheads)


@dataclass
class Variant:
    attn: object  # AttentionSpec or None (no statistics)


def batch_step(state, spec, writer, batch, recs, v: Variant) -> float:
    """The worker's per-batch extraction work on one batch (stats too if ``v.attn``); seconds taken."""
    from kscale.attention.stats import batch_stats
    from kscale.extract import worker

    t0 = time.perf_counter()
    cap = worker.forward_capture(state, batch, queries=v.attn is not None)
    keys, pos = worker.stacked_keys(state, batch, cap)
    worker.write_batch(writer, spec, batch, recs, keys, pos)
    if v.attn is not None:
        writer.append_table("attention", batch_stats(state.loaded, state.layers, state.heads, batch, cap, v.attn,
                                                     [r.sample_id for r in recs]))
    return time.perf_counter() - t0


def commit(writer, v: Variant) -> float:
    t0 = time.perf_counter()
    writer.commit({}, [])
    return time.perf_counter() - t0


def main() -> None:
    args = bench_args()

    from kscale.spec import AttentionSpec
    from kscale.store.writer import ShardWriter

    tmp = Path(tempfile.mkdtemp(prefix="kscale-bench-attn-"))
    try:
        spec, state, recs, batches = bench_setup(args, tmp)
        default = AttentionSpec(enabled=True)
        variants = {"off": Variant(None), "after_image": Variant(default),
                    "last_k": Variant(dataclasses.replace(default, queries="last_k"))}
        # times[variant][batch] over repeats (the shard commit counts as one more step); variants are
        # interleaved batch by batch, so load drift on a shared machine hits all of them alike
        times = {name: [[] for _ in range(len(batches) + 1)] for name in variants}
        lm, bs, n = state.loaded, args.batch, 0
        for k in range(args.repeats + 1):  # round 0 is warm-up
            writers = {}
            for name in variants:
                writers[name] = ShardWriter(tmp / "store", f"s{n:06d}", n_layers=len(state.layers),
                                            n_heads=len(state.heads), head_dim=lm.info.head_dim, rope_rows=3,
                                            key_dtype=spec.extract.key_dtype, chunk_tokens=spec.output.chunk_tokens)
                n += 1
            for j, b in enumerate(batches):
                for name, v in variants.items():
                    t = batch_step(state, spec, writers[name], b, recs[j * bs:(j + 1) * bs], v)
                    if k:
                        times[name][j].append(t)
            for name, v in variants.items():
                t = commit(writers[name], v)
                if k:
                    times[name][-1].append(t)
        med = {v: sum(statistics.median(ts) for ts in per_step) for v, per_step in times.items()}
        best = {v: sum(min(ts) for ts in per_step) for v, per_step in times.items()}
        n_tok = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
        print(f"model: hidden 512, 8 layers, 8 heads / 4 KV heads x 64; {args.samples} samples of {args.image_size}px, "
              f"{n_tok} tokens, batch {args.batch}, device {lm.device}, torch threads {torch.get_num_threads()}, "
              f"{args.repeats} repeats")
        for v in variants:
            label = "without attention" if v == "off" else f"with attention ({v})"
            print(f"{label:46s} sum of per-batch medians {med[v]:.3f} s, of minima {best[v]:.3f} s")
        for v in list(variants)[1:]:
            goal = "  (goal <= 1.15)" if v == "after_image" else ""
            print(f"ratio {v}/off {med[v] / med['off']:.3f} (medians), {best[v] / best['off']:.3f} (minima){goal}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
