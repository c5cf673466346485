"""Benchmark: hooked extraction with Zarr writes vs the plain forward, same batches (not a test).

Mid-size random Qwen2.5-VL on CPU (hidden 512, 8 layers, 8 heads, 4 KV heads), generated data.
Prints the median time of each, their ratio (goal <= 1.10 on CPU), samples/s and MB/s written, and a
split of the hooked run's time into forward / gather+cast / zarr write.

    python bench/extract_overhead.py [--samples 32] [--batch 4] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(out: Path) -> str:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from kscale.models.debug import build_debug_model

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


def bench_args(ap: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The options both overhead benchmarks share."""
    ap = ap or argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--key-dtype", default="float16")
    return ap.parse_args()


def bench_setup(args: argparse.Namespace, tmp: Path):
    """(spec, worker state, records, prebuilt batches) on the benchmark model saved under ``tmp``."""
    from kscale.extract import worker
    from kscale.spec import spec_from_dict

    model_dir = build_model(tmp / "model")
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

    from kscale.extract import worker
    from kscale.store.writer import ShardWriter

    tmp = Path(tempfile.mkdtemp(prefix="kscale-bench-"))
    try:
        spec, state, recs, batches = bench_setup(args, tmp)
        lm = state.loaded
        sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

        def plain() -> None:
            with torch.inference_mode():
                for b in batches:
                    lm.model(**{k: v.to(lm.device) for k, v in b.inputs.items()}, use_cache=False)
            sync()

        parts = {"forward+hooks": 0.0, "gather+cast": 0.0, "select+append": 0.0, "commit (zarr)": 0.0}
        written = [0]

        def hooked(k: int) -> None:
            w = ShardWriter(tmp / "store", f"s{k:06d}", n_layers=len(state.layers), n_heads=len(state.heads),
                            head_dim=lm.info.head_dim, rope_rows=3, key_dtype=args.key_dtype,
                            chunk_tokens=spec.output.chunk_tokens)
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
            marker = w.commit({}, [])
            parts["commit (zarr)"] += time.perf_counter() - t3
            written[0] = marker["key_bytes"]

        plain()  # warm-up
        hooked(999)
        for key in parts:
            parts[key] = 0.0
        tp, th = [], []
        for k in range(args.repeats):  # interleaved, so drift hits both
            t = time.perf_counter()
            plain()
            tp.append(time.perf_counter() - t)
            t = time.perf_counter()
            hooked(k)
            th.append(time.perf_counter() - t)
        mp, mh = statistics.median(tp), statistics.median(th)
        n_tok = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
        print(f"model: hidden 512, 8 layers, 4 KV heads x 64; {args.samples} samples of "
              f"{args.image_size}px, {n_tok} tokens, batch {args.batch}, device {lm.device}, torch threads "
              f"{torch.get_num_threads()}")
        print(f"plain forward      median {mp:.3f} s  ({args.samples / mp:.1f} samples/s)   runs {[round(x, 3) for x in tp]}")
        print(f"hooked + write     median {mh:.3f} s  ({args.samples / mh:.1f} samples/s)   runs {[round(x, 3) for x in th]}")
        print(f"ratio hooked/plain {mh / mp:.3f}  (goal <= 1.10)")
        print(f"written            {written[0] / 1e6:.2f} MB of keys per run, {written[0] / 1e6 / mh:.1f} MB/s")
        tot = sum(parts.values())
        print("hooked time split  " + ", ".join(f"{k} {v / tot:.1%}" for k, v in parts.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
