"""MaLoRA vs PEFT LoRA of the same rank: training step time and peak memory on the same model and batches.

    python bench/malora.py                          # CPU, a small random Qwen2.5-VL, 3 rounds
    python bench/malora.py --device cuda --shape 7b # GPU: random weights of Qwen2.5-VL-7B's shape, bf16

Variants (same targets, rank, optimizer, batches, checkpointing):

- ``lora``: PEFT LoRA on the language model's projections;
- ``malora``: MaLoRA, both branches (dense blend), LM loss only;
- ``malora_align``: MaLoRA with the RFF-MMD alignment loss at every layer.

Each (round, variant) runs in a fresh subprocess so peak memory is that variant's alone (CPU: max RSS
growth after the model is built; CUDA: ``max_memory_allocated``). Rounds alternate the variants; the
reported step time is the median over steps and then the minimum over rounds (robust to other load on a
shared machine). Goals: malora/lora <= 1.03, malora_align/lora <= 1.05, on time and memory.

On CUDA also tokens/s and MFU: model FLOPs per token = 6 N + 12 L T d (PaLM convention, N the language
model's parameters, full fine-tuning) over the GPU's dense bf16 peak (``--peak-tflops``, default 989 for
H100/H200 SXM); ``hfu_4n`` counts what frozen-base adapter training really computes (4 N: no weight grads).

Legend: B batch, T tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("lora", "malora", "malora_align")
REPO = Path(__file__).resolve().parents[1]


def build_model(shape: str, device: str):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if shape == "7b":  # Qwen2.5-VL-7B-Instruct's config.json, random weights
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
    else:  # "small": a CPU-sized model where adapter overhead is still visible
        text = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=512,
                      fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
    vocab = text["vocab_size"]
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 4,
                           video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    return model


def make_batches(model, n: int, batch: int, seq: int, image_side: int, device: str) -> list[dict]:
    """Each sample: <vision_start> image tokens <vision_end> random text; answers are the last 16 tokens."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from PIL import Image

    cfg = model.config
    proc = Qwen2VLImageProcessorPil(min_pixels=image_side**2, max_pixels=image_side**2)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = [Image.fromarray(torch.randint(0, 255, (image_side, image_side, 3), generator=g,
                                                dtype=torch.uint8).numpy()) for _ in range(batch)]
        pix = proc(images=images, return_tensors="pt")
        n_img = int(pix["image_grid_thw"][0].prod()) // 4
        n_txt = seq - n_img - 2
        text_BT = torch.randint(0, cfg.image_token_id, (batch, n_txt), generator=g)
        ids_BT = torch.cat([torch.full((batch, 1), cfg.vision_start_token_id),
                            torch.full((batch, n_img), cfg.image_token_id),
                            torch.full((batch, 1), cfg.vision_end_token_id), text_BT], dim=1)
        answer_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
        answer_BT[:, -16:] = True
        modality_BT = (ids_BT == cfg.image_token_id).to(torch.int8)
        inputs = {"input_ids": ids_BT, "attention_mask": torch.ones_like(ids_BT),
                  "mm_token_type_ids": modality_BT.int(), "pixel_values": pix["pixel_values"].to(model.dtype),
                  "image_grid_thw": pix["image_grid_thw"]}
        out.append({"inputs": {k: v.to(device) for k, v in inputs.items()}, "answer": answer_BT.to(device),
                    "modality": modality_BT.to(device)})
    return out


def build_variant(model, variant: str, rank: int, targets: list[str], checkpointing: bool):
    """(module, step_loss_fn, trainable params) for one variant."""
    from kscale.spec.train import AlignConfig
    from kscale.train.malora import MaLoRAConfig, MaLoRAModel
    from kscale.train.objective import MaLoRAObjective, answer_positions, encode_images, lm_loss

    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        pattern = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=pattern))
        if checkpointing:
            peft_model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})

        def loss_fn(b):  # the vision tower runs once without a graph, exactly as in MaLoRAObjective
            keep_K = answer_positions(b["answer"])
            inputs = encode_images(model, b["inputs"])
            logits = peft_model(**inputs, logits_to_keep=keep_K, use_cache=False).logits
            ids = b["inputs"]["input_ids"]
            return lm_loss(logits, ids[:, keep_K + 1], b["answer"][:, keep_K + 1].float())

        return peft_model, loss_fn
    malora = MaLoRAModel(model, MaLoRAConfig(rank=rank, alpha=2.0 * rank, target_modules=targets))
    if checkpointing:
        malora.enable_activation_checkpointing()
    align = AlignConfig(loss="mmd" if variant == "malora_align" else "none", weight=1.0)
    objective = MaLoRAObjective(malora, align)
    return objective, lambda b: objective(b["inputs"], b["answer"], b["modality"])[0]


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    model = build_model(args.shape, args.device)
    batches = make_batches(model, args.steps, args.batch, args.seq, args.image_side, args.device)
    module, loss_fn = build_variant(model, args.variant, args.rank, args.targets.split(","), args.checkpointing)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    module.train()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    for i, b in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # ru_maxrss is KiB on Linux
    step = statistics.median(times)
    text_cfg = model.config.get_text_config()
    n_lm = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    tokens = args.batch * args.seq
    L, d = text_cfg.num_hidden_layers, text_cfg.hidden_size
    flops_6n = tokens * (6 * n_lm + 12 * L * args.seq * d)
    flops_4n = tokens * (4 * n_lm + 12 * L * args.seq * d)
    out = {"variant": args.variant, "step_s": step, "peak_mib": peak, "tokens_per_s": tokens / step,
           "trainable": sum(p.numel() for p in params)}
    if args.device == "cuda":
        out["mfu"] = flops_6n / step / (args.peak_tflops * 1e12)
        out["hfu_4n"] = flops_4n / step / (args.peak_tflops * 1e12)
    return out


def run_round(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant] + _passthrough(args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device, "--shape", args.shape, "--rank", str(args.rank), "--targets", args.targets,
           "--batch", str(args.batch), "--seq", str(args.seq), "--image-side", str(args.image_side),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--peak-tflops", str(args.peak_tflops)]
    return out + (["--checkpointing"] if args.checkpointing else [])


def summarize(results: dict[str, list[dict]]) -> dict:
    """Best step time and median peak per variant, ratios to ``lora``, and the goals (issue 6)."""
    results = {v: rs for v, rs in results.items() if rs}
    best = {v: min(rs, key=lambda r: r["step_s"]) for v, rs in results.items()}
    peak = {v: statistics.median(r["peak_mib"] for r in rs) for v, rs in results.items()}
    ref_t, ref_m = best["lora"]["step_s"], peak["lora"]
    summary = {"variants": {v: {**best[v], "peak_mib": peak[v]} for v in results}}
    summary["time_ratio"] = {v: best[v]["step_s"] / ref_t for v in results if v != "lora"}
    summary["memory_ratio"] = {v: peak[v] / ref_m if ref_m > 0 else float("nan") for v in results if v != "lora"}
    summary["goals_met"] = {  # a variant that did not run (or has no ratio) has not met its goal
        f"{v}_{what}<={bound}": v in ratios and ratios[v] <= bound
        for v, bound in (("malora", 1.03), ("malora_align", 1.05))
        for what, ratios in (("time", summary["time_ratio"]), ("mem", summary["memory_ratio"]))
    }
    summary["missing"] = [v for v in VARIANTS if v not in results]
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", choices=["small", "7b"], default=None, help="default: small on CPU, 7b on CUDA")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="k_proj", help="comma-separated projections (same for both methods)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="tokens per sample, image tokens included")
    p.add_argument("--image-side", type=int, default=None, help="pixels per image side")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (default on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--out", default=None, help="write the JSON summary here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.shape = args.shape or ("7b" if cuda else "small")
    args.batch = args.batch or (4 if cuda else 2)
    args.seq = args.seq or (2048 if cuda else 512)
    args.image_side = args.image_side or (448 if cuda else 224)
    args.steps = args.steps or (12 if cuda else 10)
    args.checkpointing = args.checkpointing or cuda
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            results[v].append(run_round(args, v))
            print(f"round {r} {v}: {results[v][-1]}", file=sys.stderr, flush=True)
    summary = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "variant")}, **summarize(results)}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
