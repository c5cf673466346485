"""Benchmark: extraction throughput at real shapes on one GPU (not a test).

A random-weight Qwen2.5-VL at the published config (``kscale.models.checkpoints``: 7B, 32B or 72B, vision
tower included; ``--layers`` cuts the language model to its first N layers, for 72B layer shapes on one
GPU) reads batches of real-size images (default 1036 x 756 px: 999 image tokens each) plus a prompt. Per
round, interleaved: the plain forward, and extraction through ``kscale.extract.worker.start_shard`` (the
pipelined path: keys of every layer selected and cast on the GPU, copied behind the forward, written
and committed to a Zarr store on the drain thread) over consecutive shards. Prints tokens/s, MFU (model
FLOPs of the forward: LM and vision linears, causal LM attention, vision attention), key MB/s written
and the hooked/plain ratio. Goals on an H100/H200 (issue 15): ratio <= 1.05 at batch 8, >= 20k
tokens/s/GPU with every layer's keys written (>= 40% MFU).

    python bench/extract_throughput.py                       # 7B, batch 8, on cuda
    python bench/extract_throughput.py --model 72b --layers 8
    python bench/extract_throughput.py --smoke               # tiny config on CPU: the code path only
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def args_() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="7b", choices=["7b", "32b", "72b"])
    ap.add_argument("--layers", type=int, default=None, help="first N LM layers only (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="batches per shard")
    ap.add_argument("--shards", type=int, default=2, help="consecutive shards per timed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image", default="1036x756", help="W x H of every image in pixels (multiples of 28)")
    ap.add_argument("--text-tokens", type=int, default=96)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, one round: checks the code path")
    a = ap.parse_args()
    if a.smoke:
        a.device, a.batch, a.batches, a.shards, a.repeats, a.image, a.text_tokens = "cpu", 2, 2, 2, 1, "112x84", 16
    return a


def build_config(a: argparse.Namespace):
    from kscale.models.checkpoints import qwen2_5_vl_config

    cfg = qwen2_5_vl_config(a.model, num_layers=a.layers)
    if a.smoke:  # the real architecture at toy width
        cfg.text_config.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=2))
        cfg.text_config.rope_parameters["mrope_section"] = [2, 3, 3]
        cfg.vision_config.update(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                      out_hidden_size=64, fullatt_block_indexes=[1]))
    return cfg


def build_loaded(cfg, device: torch.device, dtype: torch.dtype):
    """A ``LoadedModel`` over random weights (no tokenizer: batches are built from token ids here)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from kscale.models.registry import LoadedModel, ModelInfo, get_adapter

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    tc = cfg.text_config
    info = ModelInfo(family="qwen2_5_vl", model_type="qwen2_5_vl", num_layers=tc.num_hidden_layers,
                     num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
                     head_dim=tc.hidden_size // tc.num_attention_heads, hidden_size=tc.hidden_size,
                     config_hash="bench", path="random")
    return LoadedModel(get_adapter("qwen2_5_vl"), model, None, None, info, device, dtype)


def build_batch(cfg, a: argparse.Namespace, dtype: torch.dtype, seed: int):
    """One ``Batch``: per sample <vision_start> image tokens <vision_end> then random text tokens."""
    from kscale.models.registry import IMAGE, SPECIAL, TEXT, Batch

    w, h = (int(x) for x in a.image.split("x"))
    vc = cfg.vision_config
    gh, gw = h // vc.patch_size, w // vc.patch_size
    n_img = gh * gw // vc.spatial_merge_size ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 150000, (a.batch, a.text_tokens), generator=g)
    img = torch.full((a.batch, n_img), cfg.image_token_id)
    ids = torch.cat([torch.full((a.batch, 1), cfg.vision_start_token_id), img,
                     torch.full((a.batch, 1), cfg.vision_end_token_id), text], dim=1)
    B, T = ids.shape
    patch = 3 * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.randn(a.batch * gh * gw, patch, generator=g).to(dtype)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "pixel_values": pixels,
              "image_grid_thw": torch.tensor([[1, gh, gw]] * a.batch),
              "mm_token_type_ids": (ids == cfg.image_token_id).int()}
    modality = torch.full((B, T), TEXT, dtype=torch.int8)
    modality[ids == cfg.image_token_id] = IMAGE
    modality[(ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)] = SPECIAL
    image_index = torch.where(ids == cfg.image_token_id, 0, -1).to(torch.int16)
    return Batch(inputs, modality, image_index, torch.zeros(B, T, dtype=torch.bool), [n_img] * B), gh * gw


def forward_flops(cfg, model, batch, patches_per_image: int) -> float:
    """Model FLOPs of one forward: 2 x params x tokens for the linears, plus attention score/value matmuls."""
    tc, vc = cfg.text_config, cfg.vision_config
    B, T = batch.inputs["input_ids"].shape
    lm = sum(p.numel() for n, p in model.named_parameters() if ".language_model.layers." in n)
    vis = sum(p.numel() for n, p in model.named_parameters() if ".visual." in n)
    lm_attn = 2 * tc.num_hidden_layers * B * T * T * tc.hidden_size  # causal: half of 4 T^2 d
    P = patches_per_image
    window = (vc.window_size // vc.patch_size) ** 2
    full = len(vc.fullatt_block_indexes)
    vis_attn = 4 * B * vc.hidden_size * P * (full * P + (vc.depth - full) * window)
    return 2 * lm * B * T + 2 * vis * B * P + lm_attn + vis_attn


def main() -> None:
    a = args_()
    from kscale.data.records import Record, RecordList, Shard
    from kscale.extract import worker
    from kscale.spec import spec_from_dict

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = build_config(a)
    loaded = build_loaded(cfg, device, dtype)
    per_shard = a.batch * a.batches
    tmp = Path(tempfile.mkdtemp(prefix="kscale-throughput-"))
    try:
        batches, patches = [], 0
        for k in range(a.batches):
            b, patches = build_batch(cfg, a, dtype, seed=k)
            batches.append(b)
        recs = [Record(i, str(i), None, "") for i in range(per_shard)]
        prebuilt = {tuple(range(k * a.batch, (k + 1) * a.batch)): b for k, b in enumerate(batches)}
        worker.build = lambda _s, rs, with_answers=False: prebuilt[tuple(r.sample_id for r in rs)]
        spec = spec_from_dict({
            "kind": "extract", "model": {"path": "debug:qwen2_5_vl"},
            "data": {"source": "generated", "generated": {"n_samples": per_shard}, "shard_size": per_shard},
            "extract": {"batch_size": a.batch, "key_dtype": "float16", "max_seq_len": 10**6},
            "output": {"path": str(tmp / "store")}, "resources": {"executor": "local"}})
        tc = cfg.text_config
        state = worker.ExtractState(loaded, list(range(tc.num_hidden_layers)), list(range(tc.num_key_value_heads)),
                                    RecordList(recs))
        shard_no = iter(range(10**6))
        written = [0]

        def plain() -> None:
            with torch.inference_mode():
                for b in batches:
                    loaded.model(**{k: v.to(device) for k, v in b.inputs.items()}, **worker.FORWARD_KWARGS)
            sync()

        def hooked() -> None:
            pending = None
            for _ in range(a.shards):
                fut = worker.start_shard(spec, Shard(next(shard_no), 0, per_shard), state)
                if pending is not None:
                    written[0] = pending.result()["key_bytes"]
                pending = fut
            written[0] = pending.result()["key_bytes"]
            sync()

        plain()  # warm-up (kernels, allocator, pinned host pool)
        hooked()
        tp, th = [], []
        for _ in range(a.repeats):
            t = time.perf_counter()
            for _ in range(a.shards):
                plain()
            tp.append((time.perf_counter() - t) / a.shards)
            t = time.perf_counter()
            hooked()
            th.append((time.perf_counter() - t) / a.shards)
            shutil.rmtree(tmp / "store" / "shards", ignore_errors=True)
        mp, mh = statistics.median(tp), statistics.median(th)
        B, T = batches[0].inputs["input_ids"].shape
        tokens = a.batches * B * T
        flops = a.batches * forward_flops(cfg, loaded.model, batches[0], patches)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        n_params = sum(p.numel() for p in loaded.model.parameters())
        print(f"model: Qwen2.5-VL-{a.model} config{'' if a.layers is None else f', first {a.layers} LM layers'}"
              f"{' (smoke: toy widths)' if a.smoke else ''}, {n_params / 1e9:.2f} B params, {dtype}, on {name}")
        print(f"batch {B} x {T} tokens ({batches[0].n_image_tokens[0]} image tokens from {a.image} px), "
              f"{a.batches} batches per shard, {a.shards} shards per block, {a.repeats} rounds")
        for label, m, runs in (("plain forward", mp, tp), ("extraction", mh, th)):
            mfu = f", MFU {flops / m / (peak * 1e12):.1%}" if peak else ""
            print(f"{label:14s} {m:.3f} s/shard  {tokens / m:,.0f} tokens/s{mfu}   runs {[round(x, 3) for x in runs]}")
        print(f"ratio extraction/plain {mh / mp:.3f}   keys {written[0] / 1e6:.1f} MB/shard, "
              f"{written[0] / 1e6 / mh:.0f} MB/s written")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
