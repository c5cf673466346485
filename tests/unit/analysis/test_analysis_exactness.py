"""The speed-ups of the analysis change no number: each fast path equals the plain formulation it replaced,
bit for bit (``np.array_equal``), on inputs with samples crossing batch boundaries, several kernels,
normalisations and bandwidths.

The references below are the straightforward versions (``np.add.reduceat`` per batch, ``np.where`` masks,
``triu_indices``): what the rows of earlier runs were computed with.
"""

from __future__ import annotations

import numpy as np
import pytest

from kscale.analysis import features as F
from kscale.analysis import mmd as M


def _plan(d: int, batch_rows: int) -> tuple[F.ChunkPlan, F.TargetPlan]:
    target = F.TargetPlan(heads=[0], bandwidth={"none": 3.0, "l2": 0.7, "standardize": 4.5},
                          centre_d=np.linspace(-0.2, 0.3, d), scale_d=np.linspace(0.8, 1.4, d))
    configs = [F.FeatureConfig(n, k, m) for n in ("none", "l2", "standardize") for k in F.RF_KERNELS
               for m in (0.5, 1.0, 2.0)]
    ids = np.arange(40)
    plan = F.ChunkPlan(F.draw_frequencies(d, 96, orthogonal=True, seed=3), configs, [], {0: target},
                       F.TableBuckets(ids, ids % 5, 5), batch_rows=batch_rows)
    return plan, target


def _reference_rf(plan: F.ChunkPlan, target: F.TargetPlan, x_Nd: np.ndarray, smp: F.BlockSamples) -> np.ndarray:
    freqs, D = plan.freqs, plan.freqs.directions_Dd.shape[0]
    out = np.zeros((len(smp.ids_S), len(plan.configs), 2, D))
    rows = max(1, min(plan.batch_rows, 2**24 // D))
    for lo in range(0, len(x_Nd), rows):
        xb, idx = np.asarray(x_Nd[lo:lo + rows], np.float64), smp.index_N[lo:lo + rows]
        starts = F.run_starts(idx)
        for c, cfg in enumerate(plan.configs):
            z = F.normalise(xb, cfg.normalisation, target) @ freqs.directions_Dd.T
            arg = (z * F.rf_scale(freqs, cfg, target.bandwidth[cfg.normalisation])).astype(plan.dtype)
            out[idx[starts], c, 0] += np.add.reduceat(np.cos(arg), starts, axis=0, dtype=np.float64)
            out[idx[starts], c, 1] += np.add.reduceat(np.sin(arg), starts, axis=0, dtype=np.float64)
    return out


@pytest.mark.parametrize("batch_rows", [7, 64, 2048])
def test_per_sample_rf_equals_reduceat_reference(batch_rows):
    rng = np.random.default_rng(0)
    d, n = 8, 300
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(np.sort(rng.integers(0, 40, n)))
    plan, target = _plan(d, batch_rows)
    got = F._per_sample_rf(plan, target, x, smp)
    assert np.array_equal(got, _reference_rf(plan, target, x, smp))


def _reference_pair_sums(a, b, ids_a, ids_b, bk_a, bk_b, kernels, K, exclude, block):
    def kernel(sq, name, bw):
        return np.exp(-sq / (2.0 * bw**2)) if name == "rbf" else np.exp(-np.sqrt(sq) / bw)

    def sqdist(x, y):
        return np.maximum((x**2).sum(1)[:, None] + (y**2).sum(1)[None, :] - 2.0 * x @ y.T, 0.0)

    k = len(kernels)
    out = [np.zeros(k), np.zeros((k, K)), np.zeros((k, K)), np.zeros((k, K))]
    for i in range(0, len(a), block):
        for j in range(0, len(b), block):
            sq = sqdist(a[i:i + block], b[j:j + block])
            keep = np.ones(sq.shape, bool)
            if exclude == "sample":
                keep = ids_a[i:i + block, None] != ids_b[None, j:j + block]
            elif exclude == "diag" and i == j:
                np.fill_diagonal(keep, False)
            ba, bb = bk_a[i:i + block], bk_b[j:j + block]
            same = keep & (ba[:, None] == bb[None, :])
            for q, (name, bw) in enumerate(kernels):
                kb = np.where(keep, kernel(sq, name, bw), 0.0)
                out[0][q] += kb.sum()
                out[1][q] += np.bincount(ba, kb.sum(1), K)
                out[2][q] += np.bincount(bb, kb.sum(0), K)
                out[3][q] += np.bincount(ba, np.where(same, kb, 0.0).sum(1), K)
    return out


@pytest.mark.parametrize("exclude", ["sample", "diag", "none"])
def test_exact_pair_sums_equal_masked_reference(exclude):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((70, 5)), rng.standard_normal((70, 5)) + 0.3
    if exclude == "diag":
        b = a
    ids = np.sort(rng.integers(0, 12, 70))
    bk = ids % 4
    kernels = [(k, bw * m) for k in ("rbf", "laplacian") for bw in (1.3,) for m in (0.5, 1.0, 2.0)]
    got = M._pair_sums(a, b, ids, ids, bk, bk, kernels, 4, exclude, 32)
    ref = _reference_pair_sums(a, b, ids, ids, bk, bk, kernels, 4, exclude, 32)
    for g, r in zip((got.total_k, got.row_kK, got.col_kK, got.same_kK), ref):  # margins of the bucket-pair sums:
        np.testing.assert_allclose(g, r, rtol=1e-13, atol=0)  # the same terms added in another order


def test_median_bandwidth_equals_triu_reference():
    pool = np.random.default_rng(3).standard_normal((301, 6))
    sq = np.maximum((pool**2).sum(1)[:, None] + (pool**2).sum(1)[None, :] - 2.0 * pool @ pool.T, 0.0)
    assert M.median_bandwidth(pool) == float(np.sqrt(np.median(sq[np.triu_indices(len(pool), 1)])))


def _kernel_block_before(sq, kernel, bandwidth, dist=None):
    """``mmd.kernel_block`` before the laplacian lost its negation pass (the demo's exact rows were these bits)."""
    if kernel == "rbf":
        out = np.divide(sq, -(2.0 * bandwidth**2))
    else:
        out = np.negative(np.sqrt(sq) if dist is None else dist)
        out /= bandwidth
    return np.exp(out, out=out)


def _pair_bucket_sums_before(a, b, ids_a, ids_b, bk_a, bk_b, kernels, K, exclude, block):
    """``mmd._pair_sums``' bucket-pair sums and counts before the left-out pairs went to a spare bin: each kernel
    block masked to 0 and summed into K * K bins by one bincount."""
    pair = np.zeros((len(kernels), K, K))
    count = np.zeros((3, K))
    for i in range(0, len(a), block):
        for j in range(0, len(b), block):
            sq = M._sqdist(a[i:i + block], b[j:j + block])
            keep = np.ones(sq.shape, bool)
            if exclude == "sample":
                keep = ids_a[i:i + block, None] != ids_b[None, j:j + block]
            elif exclude == "diag" and i == j:
                np.fill_diagonal(keep, False)
            ba, bb = bk_a[i:i + block], bk_b[j:j + block]
            same = keep & (ba[:, None] == bb[None, :])
            count += [np.bincount(ba, keep.sum(1), K), np.bincount(bb, keep.sum(0), K), np.bincount(ba, same.sum(1), K)]
            dist = np.sqrt(sq) if any(k == "laplacian" for k, _ in kernels) else None
            index = (ba[:, None] * K + bb[None, :]).ravel()
            for q, (kernel, bw) in enumerate(kernels):
                kb = _kernel_block_before(sq, kernel, bw, dist)
                kb[~keep] = 0.0
                pair[q] += np.bincount(index, kb.ravel(), K * K).reshape(K, K)
    return pair, count


@pytest.mark.parametrize("exclude", ["sample", "diag", "none"])
def test_exact_pair_sums_are_the_bits_of_the_masked_blocks(exclude):
    """The spare bin for left-out pairs and the laplacian's one pass fewer change no bit of the exact rows' sums
    (several blocks, uneven last ones, twins across the sides as fp16 keys have)."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((230, 6)), rng.standard_normal((210, 6)) + 0.3
    b[:40] = a[:40]
    if exclude == "diag":
        b = a
    ids_a, ids_b = np.sort(rng.integers(0, 30, len(a))), np.sort(rng.integers(0, 30, len(b)))
    bk_a, bk_b = (ids_a * 7) % 8, (ids_b * 7) % 8
    kernels = [(k, 1.7 * m) for k in ("rbf", "laplacian") for m in (0.5, 1.0, 2.0)]
    got = M._pair_sums(a, b, ids_a, ids_b, bk_a, bk_b, kernels, 8, exclude, 64)
    pair, count = _pair_bucket_sums_before(a, b, ids_a, ids_b, bk_a, bk_b, kernels, 8, exclude, 64)
    assert np.array_equal(got.pair_kKK, pair) and np.array_equal(got.count, count)
    for kernel, bw in kernels:
        sq = M._sqdist(a, b)
        assert np.array_equal(M.kernel_block(sq, kernel, bw), _kernel_block_before(sq, kernel, bw))
