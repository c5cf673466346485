"""Benchmark: random-feature throughput of the analysis, numpy on the CPU vs torch on a GPU (not a test).

One target's per-sample cos/sin sums (``features._per_sample_rf``: the work of every streamed key block)
over N fp16 keys of d = 128 dims at D = 4096 frequencies, with the default analysis configs (3
normalisations x rbf/laplacian x 3 bandwidth multiples = 18 configs) or ``--configs 1`` (one). Keys are
read as fp16, as the store holds them; throughput is reported in GB/s of fp16 keys and keys/s, after an
untimed warm-up, median of ``--repeats``. The backends compared: ``numpy`` (the CPU path; its thread count
is the machine's, ``--threads`` caps it) and ``torch`` (``kscale.analysis.gpu`` on CUDA when visible,
else torch on the CPU). Goal (issue 10): GPU >= 20x the 2-core CPU figure at D = 4096, d = 128.
Prints one JSON line per backend.

    python bench/rf_throughput.py [--n 200000] [--d 128] [--features 4096] [--backends numpy torch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def args_() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000, help="keys (rows) per timed call")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--tokens-per-sample", type=int, default=256)
    ap.add_argument("--configs", type=int, choices=[1, 18], default=18)
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["numpy", "torch"], choices=["numpy", "torch"])
    ap.add_argument("--threads", type=int, default=None, help="cap CPU threads (numpy and torch)")
    return ap.parse_args()


def plan_for(a: argparse.Namespace, backend: str):
    from kscale.analysis.features import ChunkPlan, FeatureConfig, TargetPlan, draw_frequencies
    from kscale.analysis.source import Buckets

    rng = np.random.default_rng(0)
    target = TargetPlan([0], {"none": 11.0, "l2": 0.9, "standardize": 15.0}, rng.standard_normal(a.d),
                        rng.uniform(0.5, 2, a.d))
    if a.configs == 1:
        configs = [FeatureConfig("none", "rbf", 1.0)]
    else:
        configs = [FeatureConfig(n, k, m) for n in ("none", "l2", "standardize") for k in ("rbf", "laplacian")
                   for m in (0.5, 1.0, 2.0)]
    freqs = draw_frequencies(a.d, a.features, orthogonal=True, seed=1)
    return ChunkPlan(freqs, configs, [], {0: target}, Buckets(8, 0), a.compute_dtype, 2048, backend=backend), target


def main() -> None:
    a = args_()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    from kscale.analysis.features import BlockSamples, _per_sample_rf

    if a.threads:
        torch.set_num_threads(a.threads)
    x_Nd = (np.random.default_rng(1).standard_normal((a.n, a.d)) * 3).astype(np.float16)
    smp = BlockSamples.of(np.arange(a.n) // a.tokens_per_sample)
    gbytes = x_Nd.nbytes / 1e9
    for backend in a.backends:
        plan, target = plan_for(a, backend)
        cuda = backend == "torch" and torch.cuda.is_available()

        def once() -> float:
            t0 = time.perf_counter()
            out = _per_sample_rf(plan, target, x_Nd, smp)
            assert out.shape[-1] == a.features and np.isfinite(out).all()
            return time.perf_counter() - t0

        once()  # warm-up: CUDA context, kernels, BLAS threads
        secs = statistics.median(once() for _ in range(a.repeats))
        print(json.dumps({
            "backend": backend, "device": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()}",
            "threads": a.threads or os.cpu_count(), "n": a.n, "d": a.d, "D": a.features,
            "configs": len(plan.configs), "compute_dtype": a.compute_dtype, "seconds": round(secs, 4),
            "GB_per_s_fp16": round(gbytes / secs, 4), "keys_per_s": round(a.n / secs)}), flush=True)


if __name__ == "__main__":
    main()
