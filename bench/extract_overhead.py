"""Benchmark: hooked extraction with Zarr writes vs the plain forward, same batches (not a test).

Mid-size random Qwen2.5-VL on CPU (hidden 512, 8 layers, 8 heads, 4 KV heads), generated data;
``--family F`` scales another family's ``debug:F`` model to the same language-model size instead.
Three variants per round, interleaved: the plain forward, the synchronous hooked path (before: full
outputs to the host, select, cast, append, commit in turn) and the pipelined path (after: select and
cast where the layer ran, writes and the commit on the drain thread behind the next forwards). Each is
timed over ``--pipeline-shards`` consecutive shards of ``--samples`` samples (the pipelined path waits for
its last commit inside the time). Prints medians per shard, the ratios (goal <= 1.10 on CPU: each round's
hooked time over the same round's plain forward, median, quartiles and range over rounds), MB/s
written, the split of the synchronous path's time, and the CPU seconds of every thread of the process
per shard (``time.process_time``; on a machine others load, steadier than wall time).

    python bench/extract_overhead.py [--family qwen2_5_vl] [--samples 32] [--batch 4] [--repeats 9] [--device cpu]
                                     [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(out: Path, family: str = "qwen2_5_vl") -> str:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from kscale.models.debug import build_debug_model

    if family != "qwen2_5_vl":
        return build_scaled_model(out, family)
    build_debug_model("qwen2_5_vl", out)  # tokenizer + processor of the debug family
    small = Qwen2_5_VLConfig.from_pretrained(out)
    tc = small.text_config
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tc.vocab_size, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                         bos_token_id=None, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=512,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=small.image_token_id, video_token_id=small.video_token_id,
        vision_start_token_id=small.vision_start_token_id, vision_end_token_id=small.vision_end_token_id)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out)
    return str(out)


def build_scaled_model(out: Path, family: str) -> str:
    """``debug:<family>`` with its language model scaled to the benchmark's size (hidden 512, 8 layers,
    8 heads, 4 KV heads of 64) and the vision tower's output to match; tokenizer and processor as saved."""
    import transformers
    from transformers import AutoConfig

    from kscale.models.debug import build_debug_model
    from kscale.models.registry import get_adapter

    build_debug_model(family, out)
    cfg = AutoConfig.from_pretrained(out)
    tc, vc = cfg.text_config, cfg.vision_config
    n0 = tc.num_hidden_layers
    tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers = 512, 1376, 8
    tc.num_attention_heads, tc.num_key_value_heads = 8, 4
    if getattr(tc, "head_dim", None):
        tc.head_dim = 64
    if getattr(tc, "no_rope_layers", None):  # Llama 4: its per-layer patterns (NoPE, chunked, MoE) repeat
        tc.no_rope_layers = [tc.no_rope_layers[i % n0] for i in range(8)]
        tc.layer_types = [tc.layer_types[i % n0] for i in range(8)]
        tc.moe_layers = [i for i in range(8) if i % n0 in set(tc.moe_layers)]
    elif getattr(tc, "layer_types", None):
        tc.layer_types = [tc.layer_types[0]] * 8
    rope = dict(tc.rope_parameters)
    if "mrope_section" in rope:
        rope["mrope_section"] = [8, 12, 12]
    tc.rope_parameters = rope
    # the vision tower keeps its debug width; only an output dim the config names separately must match the LM
    if hasattr(vc, "out_hidden_size"):
        vc.out_hidden_size = 512
    elif cfg.model_type == "qwen2_vl":  # the merger's output is vision_config.hidden_size (embed_dim the width)
        vc.hidden_size = 512
    if cfg.model_type == "paligemma":  # the projector maps to projection_dim, which must be the LM's width
        cfg.projection_dim = vc.projection_dim = cfg.hidden_size = 512
    torch.manual_seed(0)
    getattr(transformers, get_adapter(family).model_class)(cfg).save_pretrained(out)
    return str(out)


def bench_args(ap: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The options both overhead benchmarks share."""
    ap = ap or argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen2_5_vl", help="model family (debug:<family> scaled up)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9,
                    help="interleaved rounds; the ratios are medians of per-round ratios, with their spread")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--key-dtype", default="float16")
    ap.add_argument("--pipeline-shards", type=int, default=2,
                    help="consecutive shards per timed block (the pipelined path overlaps their commits)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a machine others load, use 1: OpenMP threads "
                         "spin while they wait for a core, which inflates and scatters CPU and wall times")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def bench_setup(args: argparse.Namespace, tmp: Path):
    """(spec, worker state, records, prebuilt batches) on the benchmark model saved under ``tmp``."""
    from kscale.extract import worker
    from kscale.spec import spec_from_dict

    model_dir = build_model(tmp / "model", args.family)
    spec = spec_from_dict({
        "kind": "extract", "model": {"path": model_dir, "device": args.device, "max_pixels": args.image_size ** 2},
        "data": {"source": "generated", "generated": {"n_samples": args.samples, "image_size": args.image_size}},
        "extract": {"batch_size": args.batch, "key_dtype": args.key_dtype},
        "output": {"path": str(tmp / "store")}, "resources": {"executor": "local"}})
    state = worker.setup(spec)
    recs = [state.source.get(i) for i in range(args.samples)]
    batches = [worker.build(state, recs[a:a + args.batch]) for a in range(0, len(recs), args.batch)]
    return spec, state, recs, batches


def main() -> None:
    args = bench_args()

    from kscale.data.records import RecordList, Shard
    from kscale.extract import worker
    from kscale.store.writer import ShardWriter

    tmp = Path(tempfile.mkdtemp(prefix="kscale-bench-"))
    try:
        spec, state, recs, batches = bench_setup(args, tmp)
        lm = state.loaded
        sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
        shard_no = iter(range(10**6))

        def plain() -> None:
            with torch.inference_mode():
                for b in batches:
                    lm.model(**{k: v.to(lm.device) for k, v in b.inputs.items()}, **worker.FORWARD_KWARGS)
            sync()

        parts = {"forward+hooks": 0.0, "gather+cast": 0.0, "select+append": 0.0, "commit (zarr)": 0.0}
        written = [0]

        def before() -> None:
            """The synchronous path: full outputs to the host, select, cast, append, commit, in turn."""
            w = ShardWriter(tmp / "store", f"s{next(shard_no):06d}", n_layers=len(state.layers),
                            n_heads=len(state.heads), head_dim=lm.info.head_dim, rope_rows=lm.adapter.rope_rows,
                            key_dtype=args.key_dtype, chunk_tokens=spec.output.chunk_tokens)
            for b, a in zip(batches, range(0, len(recs), args.batch)):
                t0 = time.perf_counter()
                cap = worker.forward_capture(state, b)
                sync()
                t1 = time.perf_counter()
                keys, pos = worker.stacked_keys(state, b, cap)
                t2 = time.perf_counter()
                worker.write_batch(w, spec, b, recs[a:a + args.batch], keys, pos)
                parts["forward+hooks"] += t1 - t0
                parts["gather+cast"] += t2 - t1
                parts["select+append"] += time.perf_counter() - t2
            t3 = time.perf_counter()
            written[0] = w.commit({}, [])["key_bytes"]
            parts["commit (zarr)"] += time.perf_counter() - t3

        def after(n_shards: int) -> None:
            """The pipelined path over consecutive shards as a worker runs them (``LocalExecutor``'s order:
            start shard k+1, then resolve shard k's commit); the last commit is waited for, inside the time."""
            pending = None
            for _ in range(n_shards):
                k = next(shard_no)
                fut = worker.start_shard(spec, Shard(k, 0, args.samples), state)
                if pending is not None:
                    pending.result()
                pending = fut
            pending.result()

        # the pipelined path reads records and builds batches itself: hand it the same prebuilt ones, so
        # all three variants time the forward and the key path, not image decoding and tokenising
        state.source = RecordList(recs)
        prebuilt = {tuple(r.sample_id for r in recs[a:a + args.batch]): b
                    for b, a in zip(batches, range(0, len(recs), args.batch))}
        worker.build = lambda _state, rs, with_answers=False: prebuilt[tuple(r.sample_id for r in rs)]
        plain()  # warm-up
        before()
        after(1)
        for key in parts:
            parts[key] = 0.0
        per = args.pipeline_shards
        tp, tb, ta = [], [], []
        cpu: dict[str, list[float]] = {"plain": [], "before": [], "after": []}
        variants = [("plain", tp, lambda: [plain() for _ in range(per)]),
                    ("before", tb, lambda: [before() for _ in range(per)]),
                    ("after", ta, lambda: after(per))]
        for k in range(args.repeats):  # interleaved, so drift hits all three; the order rotates each round,
            for name, runs, fn in variants[k % 3:] + variants[:k % 3]:  # so none always follows another
                t, c = time.perf_counter(), time.process_time()
                fn()
                runs.append((time.perf_counter() - t) / per)
                cpu[name].append((time.process_time() - c) / per)
        mp, mb, ma = statistics.median(tp), statistics.median(tb), statistics.median(ta)
        cp, cb, ca = (statistics.median(cpu[k]) for k in ("plain", "before", "after"))
        n_tok = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
        print(f"model: {args.family}, hidden 512, 8 layers, 4 KV heads x 64; {args.samples} samples of "
              f"{args.image_size}px, {n_tok} tokens, batch {args.batch}, device {lm.device}, torch threads "
              f"{torch.get_num_threads()}; times per shard of {args.samples} samples, {per} shards in a row")
        for name, m, runs in (("plain forward", mp, tp), ("before: sync hooks", mb, tb),
                              ("after: pipelined", ma, ta)):
            print(f"{name:19s} median {m:.3f} s  ({args.samples / m:.1f} samples/s)   "
                  f"runs {[round(x, 3) for x in runs]}")
        # each round's ratio against that round's plain forward (drift and load bursts hit a round's three
        # variants alike), then the median and spread over rounds
        for what, t in (("wall", (tp, tb, ta)), ("CPU", (cpu["plain"], cpu["before"], cpu["after"]))):
            for name, runs in (("before", t[1]), ("after", t[2])):
                r = sorted(x / p for x, p in zip(runs, t[0]))
                q1, q3 = (statistics.quantiles(r, n=4)[::2] if len(r) > 1 else (r[0], r[0]))
                print(f"ratio {what:4s} {name:6s} median {statistics.median(r):.3f}  quartiles {q1:.3f}-{q3:.3f}  "
                      f"range {r[0]:.3f}-{r[-1]:.3f}  ({len(r)} rounds; goal <= 1.10)")
        print(f"CPU seconds (all threads) per shard: plain {cp:.3f}, before {cb:.3f}, after {ca:.3f} "
              "(steadier than wall time on a busy machine)")
        print(f"written            {written[0] / 1e6:.2f} MB of keys per shard, {written[0] / 1e6 / ma:.1f} MB/s after")
        tot = sum(parts.values())
        print("before: time split " + ", ".join(f"{k} {v / tot:.1%}" for k, v in parts.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
