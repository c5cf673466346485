"""Benchmark of the MMD estimators (not a test): ``python bench/mmd.py [--n 20000] [--seeds 10]``.

n points per side, d = 128: exact MMD^2 (blocked float64), random-feature MMD^2 at D = 1024 / 4096 /
16384 with plain and orthogonal frequencies (time, peak traced memory, relative error vs exact over
seeds), the statistic + 1000 sequence-level permutations, and the streaming rate over a Zarr store.
Each timed call follows an untimed warm-up; peak memory comes from a separate ``tracemalloc`` pass (tracing
slows numpy's allocations, so no time is taken under it).
Goals (issue 3): orthogonal D=4096 within 1% of exact (95th percentile over seeds); statistic + 1000
permutations <= 5 s at 20k with D=1024; peak memory <= 512 MB at D <= 4096 whatever N.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((n, d)) * np.linspace(0.8, 1.2, d)
    y[:, :8] += 0.25
    return x, y


def timed(fn, warmup=None):
    """(result, seconds) of ``fn()`` after an untimed warm-up call (``warmup``, default ``fn`` itself)."""
    (warmup or fn)()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def peak_mib(fn) -> float:
    """Peak traced Python/numpy memory of one call of ``fn`` (MiB), in a pass of its own (not timed)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def measure(fn, warmup=None):
    """(result, seconds after a warm-up, peak MiB from a separate pass)."""
    out, dt = timed(fn, warmup)
    return out, dt, peak_mib(fn)


def rf_sums(x, y, plan, chunk=8192):
    from kscale.analysis.features import plain_sums

    sid = np.repeat(np.arange(2 * len(x) // 100 + 1), 100)
    out = []
    for arr, ids in ((x, sid[: len(x)]), (y, sid[len(x): 2 * len(x)])):
        acc = None
        for lo in range(0, len(arr), chunk):  # chunk is a multiple of 100: whole samples per chunk
            s = plain_sums(arr[lo:lo + chunk], ids[lo:lo + chunk], plan)
            acc = s if acc is None else acc.merge(s, plan.max_units)
        out.append(acc)
    return out


def _side(s):
    from kscale.analysis.mmd import rf_side

    return rf_side(s.count_K, s.rf_KC2D[:, 0], s.rfself_KCD[:, 0], s.nsq_K)


def rf_value(x, y, n_features, orthogonal, seed, bw):
    from kscale.analysis.features import single_target_plan
    from kscale.analysis.mmd import rf_mmd2

    plan = single_target_plan(x.shape[1], n_features=n_features, bandwidth=bw, orthogonal=orthogonal,
                              seed=seed, sample_ids=np.arange(2 * len(x) // 100 + 1), n_buckets=32)
    sx, sy = rf_sums(x, y, plan)
    return rf_mmd2(_side(sx), _side(sy), estimator="token")  # i.i.d. tokens: compare with exact


def permutation_run(x, y, bw, n_perm=1000):
    """Statistic + permutations: features summed per sequence of 100 tokens, then permuted."""
    from kscale.analysis.features import single_target_plan
    from kscale.analysis.stats import permutation_p

    plan = single_target_plan(x.shape[1], n_features=1024, bandwidth=bw, seed=0, max_units=10**6,
                              sample_ids=np.arange(2 * len(x) // 100 + 1), n_buckets=32)
    sx, sy = rf_sums(x, y, plan)
    feats, counts, flags = [], [], []
    for s, flag in ((sx, True), (sy, False)):
        _, rf_U2D, c = s.units()
        feats.append(rf_U2D.reshape(len(c), -1) / np.sqrt(1024))
        counts.append(c)
        flags.append(np.full(len(c), flag))
    c = np.concatenate(counts)
    return permutation_p(np.vstack(feats), c, c, np.concatenate(flags), n_perm, seed=0)


def streaming_rate(n_tokens: int, n_features: int) -> tuple[float, float, float]:
    """(MB/s, seconds, peak MB) of the streamed RF reduction over a Zarr store of fp16 keys (8 heads)."""
    import dask.array as da
    import zarr

    from kscale.spec.analyze import DaskConfig
    from kscale.analysis.features import chunk_sums, merger, single_target_plan
    from kscale.analysis.source import block_plan, joint_items, rows_per_block
    from kscale.analysis.stream import Runner

    heads, d = 8, 128
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.create_array(str(Path(tmp) / "k.zarr"), shape=(n_tokens, heads, d), chunks=(16384, heads, d),
                              dtype="float16")
        rng = np.random.default_rng(0)
        for lo in range(0, n_tokens, 131072):
            z[lo:lo + 131072] = rng.standard_normal((min(131072, n_tokens - lo), heads, d)).astype(np.float16)
        sid = np.repeat(np.arange(n_tokens // 200 + 1), 200)[:n_tokens]
        plan = single_target_plan(d, n_features=n_features, bandwidth=16.0, sample_ids=sid, n_buckets=32)
        plan.targets = {h: dataclasses.replace(plan.targets[0], heads=[h]) for h in range(heads)}
        ids = {"text": da.from_array(sid, chunks=(16384,))}
        with Runner(DaskConfig(n_workers=2, chunk_mb=32)) as runner:
            blocks = block_plan(ids, rows_per_block(32, heads * d * 2), 10**6, "bench")
            items = joint_items({"text": da.from_zarr(z)}, ids, blocks)
            # dask workers run in other processes: tracemalloc would see only the driver, so no peak here
            _, dt = timed(lambda: runner.map_reduce(chunk_sums, items, plan, merger(0)))
            peak = float("nan")
    mb = n_tokens * heads * d * 2 / 2**20
    return mb / dt, dt, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--stream-tokens", type=int, default=400_000)
    ap.add_argument("--only-stream", action="store_true")
    args = ap.parse_args()
    from kscale.analysis.mmd import exact_mmd2, median_bandwidth

    if args.only_stream:
        print("MB/s, seconds, peak MB:", streaming_rate(args.stream_tokens, 1024))
        return
    x, y = data(args.n, args.d)
    bw = median_bandwidth(np.vstack([x[:1000], y[:1000]]))
    # warm-up on 4096 points a side (the full exact run is the slow part of this bench)
    (exact, dt, peak) = measure(lambda: exact_mmd2(x, y, [("rbf", bw)], block=2048).value_k[0],
                                warmup=lambda: exact_mmd2(x[:4096], y[:4096], [("rbf", bw)], block=2048))
    rows = [("exact (blocked f64)", "-", f"{dt:8.2f}", f"{peak:8.1f}", f"{exact:.5f}", "0", "0")]
    for n_features in (1024, 4096, 16384):
        seeds = args.seeds if n_features <= 4096 else max(3, args.seeds // 3)
        for orthogonal in (False, True):
            errs, times = [], []
            rf_value(x, y, n_features, orthogonal, 0, bw)  # warm-up
            for seed in range(seeds):
                t0 = time.perf_counter()
                value, _ = rf_value(x, y, n_features, orthogonal, seed, bw)
                times.append(time.perf_counter() - t0)
                errs.append(abs(value - exact) / exact)
            peak = peak_mib(lambda: rf_value(x, y, n_features, orthogonal, 0, bw))  # same for every seed
            rows.append((f"RF D={n_features} {'orth' if orthogonal else 'plain'}", f"{seeds}",
                         f"{np.median(times):8.2f}", f"{peak:8.1f}", f"{np.median(errs):.2%}",
                         f"{np.percentile(errs, 95):.2%}", f"{max(errs):.2%}"))
    (p, stat), dt, peak = measure(lambda: permutation_run(x, y, bw))
    rows.append(("stat + 1000 perms, D=1024", "1", f"{dt:8.2f}", f"{peak:8.1f}", f"p={p:.4f}", "", ""))
    rate, dt, peak = streaming_rate(args.stream_tokens, 1024)
    rows.append((f"stream zarr {args.stream_tokens} tok x 8 heads, D=1024", "1", f"{dt:8.2f}",
                 f"{peak:8.1f}", f"{rate:.1f} MB/s", "", ""))
    head = ("what", "seeds", "time_s", "peak_MB", "median err / value", "p95 err", "max err")
    print(f"n = {args.n} per side, d = {args.d}, bandwidth = {bw:.3f} (median), exact MMD^2 = {exact:.6f}")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
