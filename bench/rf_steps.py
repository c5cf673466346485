"""Profile: the cost of each numpy call kind of the fast random-feature path, per key, on one thread.

cProfile cannot see inside numpy calls, so this times each kind of call alone (thread CPU time, BLAS on
one thread, median of ``--repeats`` timings of ``--calls`` calls each) at the bench's shape (d 128,
D 4096, 18 configs = 3 normalisations x 6 configs; per normalisation 2 float64 products rounded to
float32 and 4 exact power-of-two multiples) and reports microseconds per key for each step, scaled by
how many such calls one key needs. The variants of a step are alternatives for the same values
(``docs/scale.md``, "Random features at the CPU's limit"). One JSON line per step and tile size.
Sections (``--only``): ``v1``, the calls of ``features._per_sample_rf_fast`` (tiles of T rows x one
normalisation's 6 configs x D); ``stacked``, the calls of ``features._per_sample_rf_stacked`` (tiles of
T rows x 18 configs x a chunk of W frequencies, ``--chunks``); ``end_to_end``, both whole paths (thread
CPU us per key on ``--keys`` keys) at every (T, W) of the stacked one.

    OPENBLAS_NUM_THREADS=1 python bench/rf_steps.py [--tiles 1 2 4 8] [--chunks 1024 4096] [--only v1]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

D, d, G, GROUPS = 4096, 128, 6, 3  # per key: GROUPS groups of G configs
BASES, DERIVED = 2, 4  # per group: float64 products rounded to float32, exact power-of-two multiples


def timed(fn, calls: int, repeats: int) -> float:
    """Median thread CPU seconds of one call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        out.append((time.thread_time() - t0) / calls)
    return statistics.median(out)


def report(step: str, tile: int, per_call_s: float, calls_per_key: float, **extra) -> None:
    print(json.dumps({"step": step, "tile_rows": tile, "us_per_call": round(per_call_s * 1e6, 2),
                      "us_per_key": round(per_call_s * calls_per_key * 1e6, 2), **extra}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--only", choices=["v1", "stacked", "end_to_end"], nargs="+",
                    default=["v1", "stacked", "end_to_end"])
    ap.add_argument("--keys", type=int, default=1024, help="keys of the end-to-end runs")
    a = ap.parse_args()
    if "stacked" in a.only:
        for T in a.tiles:
            for W in a.chunks:
                stacked_steps(T, W, a.calls, a.repeats)
    if "end_to_end" in a.only:
        end_to_end(a.keys, a.repeats, [(T, W) for T in a.tiles for W in a.chunks])
    if "v1" not in a.only:
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, d)) * 3
    U = np.linalg.qr(rng.standard_normal((d, d)))[0]
    U_dD = np.ascontiguousarray(np.tile(U, (1, D // d)))
    zbuf = np.empty((128, D))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # projections: 2 products per key (none, standardize); l2 divides the raw one
    report("projection_dgemm_128rows", 128, timed(lambda: np.matmul(x, U_dD, out=zbuf), a.calls, a.repeats),
           2 / 128)
    R = a.repeats
    tiny = np.ones(16)
    report("call_overhead_tiny_ufunc", 1, timed(lambda: np.multiply(tiny, 2.0, out=tiny), 1000, R), 1)
    for T in a.tiles:
        z = rng.standard_normal((T, D)) * 40
        scale = rng.uniform(0.01, 3, D)
        a32 = np.empty((G, T, D), np.float32)
        v32 = np.empty((G, T, D), np.float32)
        v64 = np.empty((G, T, D))
        f64 = np.empty((T, D))
        acc = np.empty((G, D))
        out = np.zeros((4, 18, 2, D))
        ones = np.ones((1, T))
        per_tile = GROUPS / T  # tiles of one group per key
        n = a.calls * max(1, 16 // T)
        report("l2_divide", T, timed(lambda: np.divide(z, norm[:T], out=f64), n, R), 1 / T)
        report("arg_base_cast_same_kind", T,
               timed(lambda: np.multiply(z, scale, out=a32[0], casting="same_kind"), n, R), GROUPS * BASES / T)
        report("arg_base_f64_then_copyto", T,
               timed(lambda: (np.multiply(z, scale, out=f64), np.copyto(a32[0], f64, casting="same_kind")), n, R),
               GROUPS * BASES / T)
        two = np.float32(2.0)
        report("arg_pow2_multiple", T, timed(lambda: np.multiply(a32[0], two, out=a32[1]), n, R),
               GROUPS * DERIVED / T)
        a32[:] = (rng.standard_normal((G, T, D)) * 300).astype(np.float32)
        report("cos_f32", T, timed(lambda: np.cos(a32, out=v32), n, R), per_tile)
        report("sin_f32", T, timed(lambda: np.sin(a32, out=v32), n, R), per_tile)
        report("cos_f32_out_f64", T, timed(lambda: np.cos(a32, out=v64, dtype=np.float32), n, R), per_tile)
        np.cos(a32, out=v32)
        dest = out[1, 0:G, 0]
        # run sums of one part of a group's tile (one run): per key 2 parts x GROUPS groups / T rows
        sums = {
            "sum_copyto_matmul_add(v1)": lambda: dest.__iadd__(
                np.matmul(ones, (np.copyto(v64, v32), v64)[1], out=acc[:, None])[:, 0]),
            "sum_copyto_reduce_add": lambda: dest.__iadd__(
                np.add.reduce((np.copyto(v64, v32), v64)[1], axis=1, out=acc)),
            "sum_copyto_reduce_into_dest": lambda: (np.copyto(v64, v32), dest.__iadd__(v64.sum(1)))[1],
            "sum_reduce_dtype_f64": lambda: dest.__iadd__(np.add.reduce(v32, axis=1, dtype=np.float64, out=acc)),
            "sum_rowwise_mixed_add": lambda: [np.add(acc, v32[:, t], out=acc) for t in range(T)],
            "sum_einsum_f64": lambda: dest.__iadd__(np.einsum("gtd->gd", v32, dtype=np.float64)),
            "sum_reduce_of_f64_values": lambda: dest.__iadd__(np.add.reduce(v64, axis=1, out=acc)),
            "sum_matmul_of_f64_values": lambda: dest.__iadd__(np.matmul(ones, v64, out=acc[:, None])[:, 0]),
            "convert_copyto_only": lambda: np.copyto(v64, v32),
            "add_f64_rows_into_acc": lambda: [np.add(acc, v64[:, t], out=acc) for t in range(T)],
            "add_f32_rows_TGD_mixed": lambda: [np.add(acc, vt, out=acc) for vt in v32.reshape(T, G, D)],
            "add_f64_rows_TGD": lambda: [np.add(acc, vt, out=acc) for vt in v64.reshape(T, G, D)],
            "dest_iadd_only": lambda: dest.__iadd__(acc),
            "sum_TGD_reduce_axis0_dtype_f64": lambda: acc.__iadd__(
                np.add.reduce(v32.reshape(T, G, D), axis=0, dtype=np.float64)),
        }
        for name, fn in sums.items():
            report(name, T, timed(fn, n, R), 2 * per_tile)


def stacked_steps(T: int, W: int, calls: int, repeats: int) -> None:
    """The calls of the stacked path (``features._StackWork``) on a tile of T rows and W frequencies:
    18 configs, per normalisation one broadcast product of its 2 bases, one cast of the 6 bases, 2
    multiplies for the 12 power-of-two multiples, one cos and one sin of the stack, one mixed add per row,
    one flush per sample (256 rows)."""
    rng = np.random.default_rng(1)
    C, NB = 18, 6
    z = rng.standard_normal((T, W)) * 40
    S = rng.uniform(0.01, 3, (2, W))
    base = rng.standard_normal((T, NB, W)) * 40
    args = np.empty((T, C, W), np.float32)
    vals = np.empty((T, 2, C, W), np.float32)
    acc = np.zeros((2, C, W))
    out = np.zeros((C, 2, 4096))
    perm = rng.permutation(C)
    chunks = 4096 / W  # chunks per key
    per_tile = chunks / T  # tile calls per key
    two, four = np.float32(2), np.float32(4)
    report("stack_base_product_f64", T, timed(lambda: np.multiply(z[:, None, :], S[None], out=base[:, :2]),
                                              calls, repeats), 3 * per_tile, chunk=W)
    report("stack_cast_bases_f32", T, timed(lambda: np.copyto(args[:, :NB], base, casting="same_kind"),
                                            calls, repeats), per_tile, chunk=W)
    report("stack_pow2_multiples", T, timed(lambda: (np.multiply(args[:, :NB], two, out=args[:, NB:2 * NB]),
                                                     np.multiply(args[:, :NB], four, out=args[:, 2 * NB:])),
                                            calls, repeats), per_tile, chunk=W)
    args[:] = (rng.standard_normal((T, C, W)) * 300).astype(np.float32)
    report("stack_cos", T, timed(lambda: np.cos(args, out=vals[:, 0]), calls, repeats), per_tile, chunk=W)
    report("stack_sin", T, timed(lambda: np.sin(args, out=vals[:, 1]), calls, repeats), per_tile, chunk=W)
    report("stack_mixed_add_per_row", T, timed(lambda: np.add(acc, vals[0], out=acc), calls, repeats),
           chunks, chunk=W)
    report("stack_flush_per_sample", T, timed(lambda: out[perm, :, :W].__iadd__(acc.transpose(1, 0, 2)),
                                              calls, repeats), chunks / 256, chunk=W)


def end_to_end(n: int, repeats: int, settings: list[tuple[int, int]]) -> None:
    """Thread CPU microseconds per key of the whole fast and stacked paths (bench's plan, one thread)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from types import SimpleNamespace

    import rf_throughput as bench  # noqa: E402

    from kscale.analysis import features as F

    a = SimpleNamespace(d=d, features=D, configs=18, compute_dtype="float32", threads=1)
    plan, target = bench.plan_for(a, "numpy")
    x = (np.random.default_rng(1).standard_normal((n, d)) * 3).astype(np.float16)
    smp = F.BlockSamples.of(np.arange(n) // 256)
    ref = F._per_sample_rf_fast(plan, target, x, smp)
    t = timed(lambda: F._per_sample_rf_fast(plan, target, x, smp), 1, repeats)
    report("end_to_end_fast", 0, t, 1 / n)
    for tile, chunk in settings:
        F._STACK_TILE_ROWS, F._STACK_CHUNK = tile, chunk
        got = F._per_sample_rf_stacked(plan, target, x, smp)
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        t = timed(lambda: F._per_sample_rf_stacked(plan, target, x, smp), 1, repeats)
        report("end_to_end_stacked", tile, t, 1 / n, chunk=chunk, max_rel_diff_vs_fast=err)


if __name__ == "__main__":
    main()
