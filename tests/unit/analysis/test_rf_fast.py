"""The fast numpy random features (``features._per_sample_rf_fast``, issue 26) give today's sums.

The reference is ``features._per_sample_rf_reference``, the numpy path every earlier row was computed with
(itself checked bit for bit against ``np.add.reduceat`` in test_analysis_exactness.py). Equal means to
1e-9 relative (``rtol=1e-9``, with an absolute floor of 1e-12 x the largest sum for sums that cancel to
~0). Cases cover the three normalisations, both kernels, bandwidth multiples that are powers of two of
each other (one rounded argument serves them) and one that is not, configs listed out of normalisation
order (a group's configs are then not contiguous), float32 and float64, threads 1-3, batch splits,
blocks and tiles small enough that samples cross tiles, blocks and threads, one-row remainders, and
samples of one row, of many rows and of the whole block. Mergeability: sums over two halves of a block,
merged, equal the sums over the whole block and the reference's.
"""

from __future__ import annotations

import numpy as np
import pytest

from kscale.analysis import features as F

from tests.unit.analysis.rf_plans import (  # noqa: F401
    NORMS, bench_shape_case, rf_plan as _plan, sample_ids as _sample_ids,
)


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("layout,dtype,shuffle", [("mixed", "float32", False), ("rows", "float32", False),
                                                  ("whole", "float32", False), ("mixed", "float32", True),
                                                  ("mixed", "float64", False), ("whole", "float64", True)])
@pytest.mark.parametrize("threads,batch_rows,block_rows,tile_rows", [(1, 2048, 128, 16), (2, 64, 10, 3),
                                                                     (3, 7, 3, 2)])
def test_fast_sums_equal_the_reference(layout, dtype, shuffle, threads, batch_rows, block_rows, tile_rows,
                                       monkeypatch):
    """Every config's per-sample cos/sin sums equal today's to 1e-9 relative."""
    monkeypatch.setattr(F, "_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(F, "_FAST_TILE_VALUES", tile_rows * 24)
    rng = np.random.default_rng(7)
    n, d = 101 if layout == "rows" else 301, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(_sample_ids(layout, n, rng))
    plan, target = _plan(d, 24, dtype=dtype, batch_rows=batch_rows, threads=threads, shuffle=shuffle)
    got = F._per_sample_rf_fast(plan, target, x, smp)
    ref = F._per_sample_rf_reference(plan, target, x, smp)
    assert got.shape == ref.shape == (len(smp.ids_S), len(plan.configs), 2, 24)
    _assert_close(got, ref)


def test_fast_sums_at_the_bench_shape_equal_the_reference():
    """The bench's shape (d 128, D 4096, the 18 default configs, samples of 256 rows, one crossing a block
    boundary), on fewer rows: equal to 1e-9 relative in every (sample, config, part) row."""
    plan, target, x, smp = bench_shape_case()
    got, ref = F._per_sample_rf_fast(plan, target, x, smp), F._per_sample_rf_reference(plan, target, x, smp)
    row_err = np.abs(got - ref).max(axis=3) / np.abs(ref).max(axis=3)
    assert row_err.max() <= 1e-9


def test_blocks_cover_the_rows_inside_batches_and_never_hold_one_row_alone():
    """Blocks tile [0, n) in order, stay inside the reference's batches, and a one-row remainder joins the
    block before it (a one-row BLAS product is a matrix-vector product: other bits)."""
    for n, batch, rows in [(301, 2048, 10), (301, 64, 10), (7, 7, 3), (1, 2048, 128), (129, 2048, 128),
                           (4097, 2048, 128), (130, 64, 64)]:
        blocks = F._fast_blocks(n, batch, rows)
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(b0[1] == b1[0] for b0, b1 in zip(blocks, blocks[1:]))
        for a, b in blocks:
            assert a // batch == (b - 1) // batch, (n, batch, rows, a, b)
            assert b - a >= 2 or min(batch, n - a // batch * batch) == 1, (n, batch, rows, a, b)
            assert b - a <= rows + 1


def test_numpy_backend_runs_the_fast_path(monkeypatch):
    """``_per_sample_rf`` (what chunk_sums calls) runs the fast path for the numpy backend when the compiled
    kernel is off (``KSCALE_RF_KERNEL=0``; with it, test_rf_kernel.py)."""
    monkeypatch.setenv("KSCALE_RF_KERNEL", "0")
    calls = []
    monkeypatch.setattr(F, "_per_sample_rf_fast", lambda *a: calls.append(a) or "fast")
    plan, target = _plan(4, 8)
    assert F._per_sample_rf(plan, target, np.zeros((3, 4)), F.BlockSamples.of(np.zeros(3, int))) == "fast"
    assert len(calls) == 1


def _side(plan, target, x, ids):
    return F.side_block(plan, target, x[:, None, :], ids).sums


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_sums_merge_over_halves_and_equal_the_reference(threads, monkeypatch):
    """Sums over two halves of a block merged == sums over the whole == the reference path's sums (the
    numpy path: the compiled kernel off; with it, test_rf_kernel.py)."""
    monkeypatch.setenv("KSCALE_RF_KERNEL", "0")
    monkeypatch.setattr(F, "_BLOCK_ROWS", 9)
    monkeypatch.setattr(F, "_FAST_TILE_VALUES", 4 * 24)
    rng = np.random.default_rng(3)
    n, d = 400, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    ids = np.sort(rng.integers(0, 60, n))
    cut = int(np.searchsorted(ids, ids[n // 2]))  # a sample boundary: samples lie in one block
    plan, target = _plan(d, 24, threads=threads, batch_rows=64)
    whole = _side(plan, target, x, ids)
    halves = _side(plan, target, x[:cut], ids[:cut]).merge(_side(plan, target, x[cut:], ids[cut:]))
    monkeypatch.setattr(F, "_per_sample_rf_fast", F._per_sample_rf_reference)
    ref = _side(plan, target, x, ids)
    for name in ("rf_KC2D", "rfself_KCD"):
        _assert_close(getattr(halves, name), getattr(whole, name))
        _assert_close(getattr(whole, name), getattr(ref, name))
    assert whole.rf_KC2D.any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_nan_key_poisons_only_its_own_sample(dtype, monkeypatch):
    """A key with a NaN makes its own sample's sums NaN and no other's, as in the reference: the fast path
    (float64 plans, and float32 without the compiled kernel) sums each run of a tile over its own rows, so
    the NaN is never multiplied by the 0 of another sample's run."""
    monkeypatch.setattr(F, "_FAST_TILE_VALUES", 16 * 24)  # tiles of 16 rows: samples of 9 rows share them
    x = np.random.default_rng(0).standard_normal((100, 8))
    x[17, 3] = np.nan  # sample 1 (rows 9-17), in a tile with samples 0 and 1
    smp = F.BlockSamples.of(np.arange(100) // 9)
    plan, target = _plan(8, 24, dtype=dtype, batch_rows=64, threads=2)
    got = F._per_sample_rf_fast(plan, target, x, smp)
    ref = F._per_sample_rf_reference(plan, target, x, smp)
    assert np.flatnonzero(np.isnan(got).any(axis=(1, 2, 3))).tolist() == [1]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    _assert_close(np.nan_to_num(got), np.nan_to_num(ref))
