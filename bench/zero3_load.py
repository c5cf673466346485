"""Benchmark: peak host memory per rank while a ZeRO-3 job loads its model (not a test).

Two gloo ranks on CPU (``torchrun``) load a ~1 GB random Qwen2.5-VL (fp32 safetensors) twice: the full
load (every rank reads the whole model, then partitions it as ``deepspeed.initialize`` does) and the
partitioned load (``kscale.train.engine.partitioned_loading``: zero.Init while ``from_pretrained`` builds
the model). Both end with each rank holding its half.
A thread samples ``/proc/self/status`` every 5 ms; the table gives each rank's peak above its
pre-load level, as a share of the model's bytes: resident (VmRSS, includes the checkpoint's mmapped
file pages, which the kernel can drop) and anonymous (RssAnon, memory the process owns). Goal: <= 0.6x.
The baseline is taken after importing the loading code (``_import_loading_code``: constant in the model's
size); the last column says what those imports took.

    python bench/zero3_load.py [--hidden 1024] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(out: Path, hidden: int, layers: int) -> int:
    """A random Qwen2.5-VL whose LM has ``layers`` x ``hidden``, saved to ``out``; returns its bytes."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from kscale.models.debug import build_debug_model

    build_debug_model("qwen2_5_vl", out)
    small = Qwen2_5_VLConfig.from_pretrained(out)
    tc = small.text_config
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tc.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 24, 24]},
                         eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=small.image_token_id, video_token_id=small.video_token_id,
        vision_start_token_id=small.vision_start_token_id, vision_end_token_id=small.vision_end_token_id)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _import_loading_code() -> None:
    """Import what loading imports on first use (the model's modeling code, DeepSpeed's ZeRO), before the
    baseline: ~130 MB of code and module objects per process here, the same for any model size (0.14x of
    this 0.9 GB model, 0.0001x of a 72B one), so it would measure Python, not how the load holds weights.
    The table prints it separately."""
    import deepspeed.runtime.zero.partition_parameters  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401
    from transformers.integrations import deepspeed as _hf_deepspeed  # noqa: F401


def rank_main(model_dir: str, mode: str, out: str) -> None:
    """One rank: join the group, load the model the way ``mode`` says, report the peak memory."""
    import torch.distributed as dist

    from kscale.models.registry import load_model
    from kscale.spec import spec_from_dict
    from kscale.train import engine as ds

    raw = {"kind": "train", "model": {"path": model_dir, "device": "cpu", "dtype": "float32"},
           "data": {"source": "generated"}, "output": {"path": out},
           "train": {"deepspeed": {"zero_stage": 3, "bf16": False}}}
    spec = spec_from_dict(raw)
    rank, world = ds.ensure_process_group(__import__("torch").device("cpu"))
    before_imports = _status()
    _import_loading_code()
    imports = {k: v - before_imports[k] for k, v in _status().items()}
    dist.barrier()
    base, peak, stop = _status(), dict(_status()), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    config = ds.deepspeed_config(spec.train, world)
    if mode == "partitioned":
        with ds.partitioned_loading(config):
            loaded = load_model(spec.model)
    else:  # load whole, then partition as deepspeed.initialize does: both end with the same partitioned model
        import deepspeed

        loaded = load_model(spec.model)
        deepspeed.zero.Init(module=loaded.model, config_dict_or_path=config)
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    local = ds.partition_report(loaded.model)["all_local"]
    rec = {"rank": rank, "mode": mode, "seconds": seconds, "local_params": local,
           **{f"peak_{k}": peak[k] - base[k] for k in peak}, **{f"imports_{k}": v for k, v in imports.items()}}
    Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rank-worker", nargs=3, metavar=("MODEL", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_worker:
        rank_main(*args.rank_worker)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kscale-zero3-"))
    try:  # a 1 GB model per run: removed at the end
        model_bytes = build(tmp / "model", args.hidden, args.layers)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        print(f"model: {model_bytes / 2**30:.2f} GiB of fp32 parameters, 2 gloo ranks on CPU")
        print(f"{'load':12s} {'rank':>4s} {'seconds':>8s} {'peak RSS':>10s} {'x model':>8s} {'peak anon':>10s} "
              f"{'x model':>8s} {'params held':>12s} {'imports (anon)':>15s}")
        for mode in ("full", "partitioned"):
            port = str(29500 + os.getpid() % 1000)
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                            __file__, "--rank-worker", str(tmp / "model"), mode, str(tmp)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            for r in range(2):
                rec = json.loads((tmp / f"{mode}-rank{r}.json").read_text())
                print(f"{mode:12s} {r:4d} {rec['seconds']:8.1f} {rec['peak_VmRSS'] / 2**30:9.2f}G "
                      f"{rec['peak_VmRSS'] / model_bytes:8.2f} {rec['peak_RssAnon'] / 2**30:9.2f}G "
                      f"{rec['peak_RssAnon'] / model_bytes:8.2f} {rec['local_params'] * 4 / model_bytes:11.2f}x "
                      f"{rec['imports_RssAnon'] / 2**20:12.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
