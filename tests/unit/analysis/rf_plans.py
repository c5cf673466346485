"""The small random-feature plans the path tests share (``test_rf_fast``, ``test_rf_kernel``,
``test_rf_stacked``, ``test_rf_tiled``, ``test_rf_sincos``): every normalisation, both kernels, multiples
with and without powers of two, and the sample layouts whose runs cross blocks and tiles."""

from __future__ import annotations

import numpy as np

from kscale.analysis import features as F

NORMS = ("none", "l2", "standardize")


def rf_plan(d: int, D: int, *, dtype: str = "float32", batch_rows: int = 2048, threads: int = 1,
            multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0), norms: tuple[str, ...] = NORMS,
            kernels: tuple[str, ...] = F.RF_KERNELS, shuffle: bool = False) -> tuple[F.ChunkPlan, F.TargetPlan]:
    """A plan over d-dimensional keys with D frequencies and one target head; ``shuffle`` interleaves the
    normalisations, so that each group's configs are scattered over the configs axis."""
    target = F.TargetPlan(heads=[0], bandwidth={"none": 3.0, "l2": 0.7, "standardize": 4.5},
                          centre_d=np.linspace(-0.2, 0.3, d), scale_d=np.linspace(0.8, 1.4, d))
    configs = [F.FeatureConfig(n, k, m) for n in norms for k in kernels for m in multiples]
    if shuffle:
        configs = [configs[i] for i in np.random.default_rng(5).permutation(len(configs))]
    ids = np.arange(400)
    plan = F.ChunkPlan(F.draw_frequencies(d, D, orthogonal=True, seed=3), configs, [], {0: target},
                       F.TableBuckets(ids, ids % 5, 5), dtype, batch_rows, threads=threads)
    return plan, target


def sample_ids(layout: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sample ids of n rows: one sample (``whole``), one per row (``rows``), or ~30 runs (``mixed``)."""
    if layout == "whole":
        return np.zeros(n, np.int64)
    if layout == "rows":
        return np.arange(n)
    return np.sort(rng.integers(0, 30, n))


def bench_shape_case() -> tuple[F.ChunkPlan, F.TargetPlan, np.ndarray, F.BlockSamples]:
    """``bench/rf_throughput.py``'s shape on 300 rows: d 128, D 4096, the 18 default configs, two threads,
    samples of 100 rows that cross tiles and a block boundary."""
    rng = np.random.default_rng(0)
    target = F.TargetPlan([0], {"none": 11.0, "l2": 0.9, "standardize": 15.0}, rng.standard_normal(128),
                          rng.uniform(0.5, 2, 128))
    configs = [F.FeatureConfig(n, k, m) for n in NORMS for k in F.RF_KERNELS for m in (0.5, 1.0, 2.0)]
    plan = F.ChunkPlan(F.draw_frequencies(128, 4096, orthogonal=False, seed=1), configs, [], {0: target},
                       F.Buckets(8, 0), "float32", 2048, threads=2)
    x = (rng.standard_normal((300, 128)) * 3).astype(np.float16)
    return plan, target, x, F.BlockSamples.of(np.arange(300) // 100)
