"""The stacked random features (``features._per_sample_rf_stacked``, issue 26: a second layout of the fast
path's work, run by ``bench/rf_throughput.py --backends stacked``) give the reference's sums, row by row,
and merge.

The reference is ``features._per_sample_rf_reference``, the numpy path every earlier row was computed with
(itself checked bit for bit against ``np.add.reduceat`` in test_analysis_exactness.py). Equal means: in
every row (sample, config, cos/sin part) the largest |difference| over the frequencies is <= 1e-9 of that
row's largest |value|. Cases cover the three normalisations, both kernels, bandwidth multiples that are
powers of two of each other (one rounded argument serves them) and one that is not (3.0), configs listed
out of normalisation order, float32 and float64 compute dtypes, threads 1-3, frequencies D that are not a
multiple of the chunk, tiles and blocks small enough that samples cross tiles, chunks, blocks and threads,
one-row batches, and samples of one row, of many rows and of the whole block; the bench's shape (d 128,
D 4096, 18 configs) with the default knobs. Mergeability: sums over two halves of a block, merged, equal
the sums over the whole block to 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest

from kscale.analysis import features as F

from tests.unit.analysis.rf_plans import (  # noqa: F401
    NORMS, bench_shape_case, rf_plan as _plan, sample_ids as _sample_ids,
)


def _assert_rows_close(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-9) -> None:
    """Per (sample, config, part) row: max |got - ref| <= rtol * max |ref| over the frequencies."""
    assert got.shape == ref.shape
    err = np.abs(got - ref).max(axis=-1) / np.maximum(np.abs(ref).max(axis=-1), 1e-300)
    assert err.max() <= rtol, (err.max(), np.unravel_index(err.argmax(), err.shape))


@pytest.mark.parametrize("layout,dtype,shuffle", [("mixed", "float32", False), ("rows", "float32", False),
                                                  ("whole", "float32", False), ("mixed", "float32", True),
                                                  ("mixed", "float64", False), ("whole", "float64", True)])
@pytest.mark.parametrize("threads,batch_rows,block_rows,tile_rows,chunk", [
    (1, 2048, 128, 2, 4096),  # the defaults: one chunk holds all 24 frequencies
    (2, 64, 10, 3, 10),  # chunks of 10, 10, 4 frequencies; samples cross tiles, blocks and threads
    (3, 7, 3, 2, 7),  # 302 rows = 43 batches of 7 + a one-row batch
    (2, 1, 128, 4, 5),  # one-row batches: every block is one row
])
def test_stacked_sums_equal_the_reference_per_row(layout, dtype, shuffle, threads, batch_rows, block_rows,
                                                  tile_rows, chunk, monkeypatch):
    """Every config's per-sample cos/sin sums equal the reference's to 1e-9 of each row's largest value."""
    monkeypatch.setattr(F, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(F, "_STACK_TILE_ROWS", tile_rows)
    monkeypatch.setattr(F, "_STACK_CHUNK", chunk)
    rng = np.random.default_rng(7)
    n, d = 101 if layout == "rows" else 302, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(_sample_ids(layout, n, rng))
    plan, target = _plan(d, 24, dtype=dtype, batch_rows=batch_rows, threads=threads, shuffle=shuffle)
    got = F._per_sample_rf_stacked(plan, target, x, smp)
    ref = F._per_sample_rf_reference(plan, target, x, smp)
    assert got.shape == (len(smp.ids_S), len(plan.configs), 2, 24)
    _assert_rows_close(got, ref)


@pytest.mark.parametrize("norms,kernels,multiples", [
    (("l2",), F.RF_KERNELS, (1.0, 2.0)),  # l2 without none: the raw projection goes to l2's own slot
    (("standardize",), ("laplacian",), (0.5, 0.75, 1.0)),  # 0.75: a base of its own
    (("l2", "none"), ("rbf",), (1.0, 4.0)),  # l2 listed before none
    (("none", "standardize", "l2"), F.RF_KERNELS, (2.0,)),
])
def test_stacked_sums_with_other_config_sets(norms, kernels, multiples, monkeypatch):
    """Subsets and orders of normalisations, one kernel, multiples with and without power-of-two partners."""
    monkeypatch.setattr(F, "_STACK_TILE_ROWS", 3)
    monkeypatch.setattr(F, "_STACK_CHUNK", 7)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((90, 8)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(np.sort(rng.integers(0, 9, 90)))
    plan, target = _plan(8, 20, norms=norms, kernels=kernels, multiples=multiples, batch_rows=32, threads=2)
    _assert_rows_close(F._per_sample_rf_stacked(plan, target, x, smp), F._per_sample_rf_reference(plan, target, x, smp))


def test_stacked_sums_when_normalisations_have_different_numbers_of_bases(monkeypatch):
    """none: 2 bases, l2: 1, standardize: 3 (one product per normalisation instead of one for all)."""
    monkeypatch.setattr(F, "_STACK_CHUNK", 9)
    plan, target = _plan(8, 20, threads=2, batch_rows=32)
    plan.configs = [F.FeatureConfig(*c) for c in [("standardize", "rbf", 3.0), ("none", "rbf", 1.0),
                                                  ("l2", "laplacian", 1.0), ("none", "laplacian", 1.0),
                                                  ("standardize", "rbf", 1.7), ("l2", "laplacian", 0.25),
                                                  ("standardize", "laplacian", 1.0), ("none", "rbf", 0.5)]]
    assert F._Stack.of(plan, target).scale_HkD is None
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((70, 8)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(np.sort(rng.integers(0, 9, 70)))
    _assert_rows_close(F._per_sample_rf_stacked(plan, target, x, smp), F._per_sample_rf_reference(plan, target, x, smp))


def test_stacked_sums_at_the_bench_shape_equal_the_reference():
    """The bench's shape (d 128, D 4096, the 18 default configs, samples of 100 rows crossing tiles and a
    block boundary) with the default knobs, on 300 rows: equal to 1e-9 in every row."""
    plan, target, x, smp = bench_shape_case()
    _assert_rows_close(F._per_sample_rf_stacked(plan, target, x, smp),
                       F._per_sample_rf_reference(plan, target, x, smp))


def test_stack_layout_serves_every_config_once_with_few_calls():
    """The stack holds each config in one slot; the default 18 configs need 6 rounded products (2 kernels x
    3 normalisations) and 2 multiplies (x2 and x4 of all 6 bases); a multiple of 3 is its own base."""
    for multiples, n_base, n_derived in [((0.5, 1.0, 2.0), 6, 2), ((0.5, 1.0, 2.0, 3.0), 12, 2), ((1.0,), 6, 0)]:
        plan, target = _plan(4, 8, multiples=multiples)
        st = F._Stack.of(plan, target)
        assert sorted(st.configs.tolist()) == list(range(len(plan.configs)))
        assert (st.n_base, len(st.derived)) == (n_base, n_derived)
        for d0, d1, srcs, f in st.derived:
            sources = range(st.n_base)[srcs]
            assert len(sources) == d1 - d0 and d0 >= st.n_base
            for dst, src in zip(range(d0, d1), sources):
                a, b = plan.configs[st.configs[dst]], plan.configs[st.configs[src]]
                assert (a.normalisation, a.kernel, a.multiple * f) == (b.normalisation, b.kernel, b.multiple)


def _side(plan, target, x, ids):
    return F.side_block(plan, target, x[:, None, :], ids).sums


@pytest.mark.parametrize("threads", [1, 2])
def test_stacked_sums_merge_over_halves(threads, monkeypatch):
    """Sums over two halves of a block merged == sums over the whole to 1e-12 (and the whole == the
    reference's to 1e-9 per row)."""
    monkeypatch.setattr(F, "_BLOCK_ROWS", 9)
    monkeypatch.setattr(F, "_STACK_TILE_ROWS", 4)
    monkeypatch.setattr(F, "_STACK_CHUNK", 10)
    monkeypatch.setattr(F, "_per_sample_rf_fast", F._per_sample_rf_stacked)  # side_block runs the stacked path
    rng = np.random.default_rng(3)
    n, d = 400, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    ids = np.sort(rng.integers(0, 60, n))
    cut = int(np.searchsorted(ids, ids[n // 2]))  # a sample boundary: samples lie in one block
    plan, target = _plan(d, 24, threads=threads, batch_rows=64)
    whole = _side(plan, target, x, ids)
    halves = _side(plan, target, x[:cut], ids[:cut]).merge(_side(plan, target, x[cut:], ids[cut:]))
    for name in ("rf_KC2D", "rfself_KCD"):
        a, b = getattr(halves, name), getattr(whole, name)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())
    assert whole.rf_KC2D.any()
    smp = F.BlockSamples.of(ids)
    _assert_rows_close(F._per_sample_rf_stacked(plan, target, x, smp), F._per_sample_rf_reference(plan, target, x, smp))
