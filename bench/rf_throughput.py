"""Benchmark: random-feature throughput of the analysis: the numpy paths side by side, and torch (not a test).

One target's per-sample cos/sin sums (``features._per_sample_rf``: the work of every streamed key block)
over N fp16 keys of d = 128 dims at D = 4096 frequencies, with the default analysis configs (3
normalisations x rbf/laplacian x 3 bandwidth multiples = 18 configs) or ``--configs 1`` (one). Keys are
read as fp16, as the store holds them; throughput is reported in GB/s of fp16 keys and keys/s, after an
untimed warm-up, median of ``--repeats``. The backends:

- ``reference``: ``features._per_sample_rf_reference``, the numpy path before issue 26 (elementwise work
  on one thread, batch_rows x D temporaries, float64 run sums value by value);
- ``tiled``: ``features._per_sample_rf_tiled``, the path the analysis ran until the fast one (one
  2048-row projection, tiles of one config at a time, cos/sin written as float64) on ``--threads``;
- ``numpy``: ``features._per_sample_rf_fast``, the numpy path the analysis runs without a C compiler (blocks
  of 128 rows, tiles of 8 rows x one normalisation's configs, float64 casts + products for the run sums), on
  ``--threads`` threads (default: the CPUs this process may use);
- ``kernel``: ``features._per_sample_rf_kernel``, the fast path's blocks with the compiled kernel
  (``kscale/analysis/rfkernel.c``: the float32 arguments and the float64 run sums in C, cos/sin by
  ``kscale_rf_sincos``, numpy's bits with one range reduction for both; ``kernel_mode`` fused or tiles,
  ``kernel_trig`` sincos, numpy or ufunc): what the analysis runs when the kernel builds (float32 only; a
  ``skipped`` line when it is unavailable); ``kernel-numpy-trig``: the same fused pass calling numpy's own
  cos and sin loops (as with ``KSCALE_RF_SINCOS=0``); ``kernel-tiles``: the same kernel in its tiles mode;
- ``stacked``: ``features._per_sample_rf_stacked``, the same work in another layout (every config's
  arguments in one stack per tile of 2 rows x 1024 frequencies that stays in a core's L2, one mixed-dtype
  add per row for the run sums), on ``--threads``; not faster under load (docs/scale.md);
- ``torch``: ``kscale.analysis.gpu`` on CUDA when visible, else torch on the CPU.

The timed calls of the chosen backends alternate (reference, numpy, kernel, reference, ...) so that all
see the same machine load; each line gives the median and ``ratio_vs_reference`` / ``ratio_vs_tiled`` /
``ratio_vs_numpy`` / ``ratio_vs_kernel`` / ``ratio_vs_kernel-numpy-trig`` (that path's median / this median), ``keys_per_cpu_s`` (keys per
second of this process's CPU time, all its threads: what other load on the machine distorts least) and,
against the reference's sums,
``max_rel_diff_vs_reference`` (max |this - reference| / max |reference|), ``max_rel_diff_per_config``
(the same per config and cos/sin part, worst of them) and ``max_rel_diff_per_row`` (per sample, config and
part, relative to that row's largest |value|, worst row); the goal is <= 1e-9 (the numpy paths give
the same bits in float32). Goals: issue 26, >= 1e4 keys/s on 2 cores; issue 10, GPU >= 20x the 2-core
CPU figure. Prints one JSON line per backend.

    python bench/rf_throughput.py [--n 200000] [--d 128] [--features 4096] [--backends reference numpy kernel]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

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
    ap.add_argument("--backends", nargs="+", default=["reference", "numpy", "kernel", "stacked", "torch"],
                    choices=["reference", "tiled", "numpy", "kernel", "kernel-numpy-trig", "kernel-tiles", "stacked",
                             "torch"])
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the tiled numpy path and cap of BLAS/torch threads (default: usable CPUs)")
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
    threads = a.threads or len(os.sched_getaffinity(0))
    return ChunkPlan(freqs, configs, [], {0: target}, Buckets(8, 0), a.compute_dtype, 2048,
                     backend="torch" if backend == "torch" else "numpy", threads=threads), target


def rel_diffs(got_SC2D: np.ndarray, ref_SC2D: np.ndarray) -> dict[str, float]:
    """Worst |got - ref| relative to the largest |ref| of the whole output, of each (config, part), of
    each (sample, config, part) row (rows that are all 0 in the reference count as 0 / 1e-300)."""
    diff = np.abs(got_SC2D - ref_SC2D)
    mag = np.abs(ref_SC2D)
    return {"max_rel_diff_vs_reference": float(diff.max() / mag.max()),
            "max_rel_diff_per_config": float((diff.max(axis=(0, 3)) / np.maximum(mag.max(axis=(0, 3)), 1e-300)).max()),
            "max_rel_diff_per_row": float((diff.max(axis=3) / np.maximum(mag.max(axis=3), 1e-300)).max())}


def main() -> None:
    a = args_()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    from kscale.analysis import rfkernel
    from kscale.analysis.features import (BlockSamples, _per_sample_rf, _per_sample_rf_fast, _per_sample_rf_kernel,
                                          _per_sample_rf_reference, _per_sample_rf_stacked, _per_sample_rf_tiled)

    if a.threads:
        torch.set_num_threads(a.threads)
    x_Nd = (np.random.default_rng(1).standard_normal((a.n, a.d)) * 3).astype(np.float16)
    smp = BlockSamples.of(np.arange(a.n) // a.tokens_per_sample)
    kernels = [b for b in a.backends if b.startswith("kernel")]
    lib = rfkernel.kernel() if kernels else None
    backends = list(a.backends)
    for b in kernels if lib is None or a.compute_dtype != "float32" else []:
        print(json.dumps({"backend": b, "skipped": "the compiled kernel is not available (float32 only; see the "
                          "warning)"}), flush=True)
        backends.remove(b)
    libs = {"kernel": lib, "kernel-tiles": None if lib is None else replace(lib, loops=None),
            "kernel-numpy-trig": None if lib is None else replace(lib, own_trig=False)}
    calls = {}
    for backend in backends:
        plan, target = plan_for(a, backend)
        fn = {"reference": _per_sample_rf_reference, "tiled": _per_sample_rf_tiled, "numpy": _per_sample_rf_fast,
              "kernel": lambda *args: _per_sample_rf_kernel(*args, lib=libs["kernel"]),
              "kernel-tiles": lambda *args: _per_sample_rf_kernel(*args, lib=libs["kernel-tiles"]),
              "kernel-numpy-trig": lambda *args: _per_sample_rf_kernel(*args, lib=libs["kernel-numpy-trig"]),
              "stacked": _per_sample_rf_stacked}.get(backend, _per_sample_rf)
        calls[backend] = (plan, lambda plan=plan, target=target, fn=fn: fn(plan, target, x_Nd, smp))
    outs, times, cpu = {}, {b: [] for b in calls}, {b: [] for b in calls}
    for backend, (_, call) in calls.items():
        outs[backend] = call()  # warm-up (CUDA context, kernels, BLAS threads), kept for the comparison
        assert outs[backend].shape[-1] == a.features and np.isfinite(outs[backend]).all()
    for _ in range(a.repeats):  # alternate the backends: each sees the same load
        for backend, (_, call) in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            times[backend].append(time.perf_counter() - t0)
            cpu[backend].append(time.process_time() - c0)
    ref = outs.get("reference")
    for backend, (plan, _) in calls.items():
        secs = statistics.median(times[backend])
        cuda = backend == "torch" and torch.cuda.is_available()
        row = {"backend": backend, "device": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()}",
               "threads": 1 if backend == "reference" else plan.threads, "n": a.n, "d": a.d,
               "D": a.features, "configs": len(plan.configs), "compute_dtype": a.compute_dtype,
               "seconds": round(secs, 4), "seconds_all": [round(t, 4) for t in times[backend]],
               "GB_per_s_fp16": round(x_Nd.nbytes / 1e9 / secs, 4), "keys_per_s": round(a.n / secs),
               "cpu_seconds": round(statistics.median(cpu[backend]), 4),
               "keys_per_cpu_s": round(a.n / statistics.median(cpu[backend]))}
        if backend.startswith("kernel"):
            row.update(kernel_library=lib.path.name, kernel_mode=libs[backend].mode,
                       kernel_trig=libs[backend].trig_kind)
        for base in ("reference", "tiled", "numpy", "kernel", "kernel-numpy-trig"):
            if base in times:
                row[f"ratio_vs_{base}"] = round(statistics.median(times[base]) / secs, 3)
        if ref is not None:
            row.update(rel_diffs(outs[backend], ref))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
