"""Benchmark: float32 cos + sin of one key's values (73,728 = 18 configs x D 4096) on one thread, numpy's two
loops (np.cos, np.sin into preallocated outputs) against ``kscale_rf_sincos`` (rfkernel.c: numpy's bits, one
range reduction for both), alternated, median of ``--repeats`` rounds of ``--keys`` keys each; prints one JSON
line with microseconds per key of each, their ratio, and whether the bits were equal (not a test).

    OPENBLAS_NUM_THREADS=1 python bench/rf_sincos.py [--keys 200] [--repeats 5] [--scale 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kscale.analysis import rfkernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=40.0, help="arguments ~ N(0, scale^2)")
    a = ap.parse_args()
    k = rfkernel.kernel()
    assert k is not None and k.loops is not None, "the fused kernel is not available"
    x = (np.random.default_rng(0).standard_normal(18 * 4096) * a.scale).astype(np.float32)
    c, s, c2, s2 = (np.empty_like(x) for _ in range(4))
    times = {"numpy": [], "sincos": []}
    for _ in range(a.repeats):
        t0 = time.process_time()
        for _ in range(a.keys):
            np.cos(x, out=c)
            np.sin(x, out=s)
        t1 = time.process_time()
        for _ in range(a.keys):
            rfkernel.call_sincos(k, x, c2, s2)
        t2 = time.process_time()
        times["numpy"].append((t1 - t0) / a.keys * 1e6)
        times["sincos"].append((t2 - t1) / a.keys * 1e6)
    us = {b: round(statistics.median(t), 1) for b, t in times.items()}
    print(json.dumps({"values_per_key": len(x), "us_cpu_per_key": us, "us_all": times,
                      "ratio": round(us["numpy"] / us["sincos"], 2), "trig_kind": k.trig_kind,
                      "bits_equal": bool(np.array_equal(c.view(np.uint32), c2.view(np.uint32))
                                         and np.array_equal(s.view(np.uint32), s2.view(np.uint32)))}))


if __name__ == "__main__":
    main()
