"""The tiled, threaded random features (``features._per_sample_rf_tiled``, issue 26; the analysis now runs
the fast path, test_rf_fast.py, and the bench keeps this one as "today's path") give the reference's sums.

The reference is ``features._per_sample_rf_reference``, the numpy path every earlier row was computed with
(itself checked bit for bit against ``np.add.reduceat`` in test_analysis_exactness.py). Equal means to
1e-9 relative (``rtol=1e-9``, with an absolute floor of 1e-12 x the largest sum for sums that cancel to
~0); in float32 the tiled path gives the same bits (same float32 arguments and cos/sin; float64 sums of
float32 values in [-1, 1] are exact in any order). Cases cover the three normalisations, both kernels,
bandwidth multiples that are powers of two of each other (one argument serves them) and one that is not,
float32 and float64, threads 1-3, batch splits, tiles small enough that samples cross tiles and thread
parts, and samples of one row, of many rows and of the whole block. Mergeability: sums over two halves
of a block, merged, equal the sums over the whole block and the reference's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kscale.analysis import features as F

from tests.unit.analysis.rf_plans import (  # noqa: F401
    NORMS, rf_plan as _plan, sample_ids as _sample_ids,
)


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("layout,dtype", [("mixed", "float32"), ("rows", "float32"), ("whole", "float32"),
                                          ("mixed", "float64"), ("whole", "float64")])
@pytest.mark.parametrize("threads,batch_rows,tile_values", [(1, 2048, F._TILE_VALUES), (2, 64, 40 * 24),
                                                            (3, 7, 3 * 24)])
def test_tiled_sums_equal_the_reference(layout, dtype, threads, batch_rows, tile_values, monkeypatch):
    """Every config's per-sample cos/sin sums equal today's; float32: the same bits."""
    monkeypatch.setattr(F, "_TILE_VALUES", tile_values)  # 40 or 3 rows per tile at D = 24
    rng = np.random.default_rng(7)
    n, d = 101 if layout == "rows" else 301, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    smp = F.BlockSamples.of(_sample_ids(layout, n, rng))
    plan, target = _plan(d, 24, dtype=dtype, batch_rows=batch_rows, threads=threads, multiples=(0.5, 1.0, 3.0))
    got = F._per_sample_rf_tiled(plan, target, x, smp)
    ref = F._per_sample_rf_reference(plan, target, x, smp)
    assert got.shape == ref.shape == (len(smp.ids_S), len(plan.configs), 2, 24)
    _assert_close(got, ref)
    if dtype == "float32":
        assert np.array_equal(got, ref)


def test_power_of_two_multiples_share_one_argument_and_others_do_not():
    """Multiples 0.5, 1, 2 derive from one rounded argument (exact); 3 gets its own product."""
    plan, target = _plan(8, 24, multiples=(0.5, 1.0, 2.0, 3.0), norms=("none",))
    steps = F._arg_steps(plan, target)["none"]
    by_cfg = {st.config: st for st in steps}
    for c, cfg in enumerate(plan.configs):
        st = by_cfg[c]
        if cfg.multiple == 0.5:
            assert st.source < 0 and st.scale_D is not None
        elif cfg.multiple == 3.0:
            assert st.source < 0, "3 / 0.5 is not a power of two: its argument is its own product"
        else:
            assert plan.configs[st.source].kernel == cfg.kernel and st.factor == 0.5 / cfg.multiple
    # the derived argument is the same bits as rounding its own float64 product
    z = np.random.default_rng(0).standard_normal((50, 24)) * 30
    for st in steps:
        if st.source >= 0:
            own = (z * F.rf_scale(plan.freqs, plan.configs[st.config], 3.0)).astype(np.float32)
            src = (z * by_cfg[st.source].scale_D).astype(np.float32)
            assert np.array_equal(src * np.float32(st.factor), own)


def _side(plan, target, x, ids):
    return F.side_block(plan, target, x[:, None, :], ids).sums


@pytest.mark.parametrize("threads", [1, 2])
def test_tiled_sums_merge_over_halves_and_equal_the_reference(threads, monkeypatch):
    """Sums over two halves of a block merged == sums over the whole == the reference path's sums."""
    monkeypatch.setattr(F, "_TILE_VALUES", 5 * 24)
    rng = np.random.default_rng(3)
    n, d = 400, 8
    x = (rng.standard_normal((n, d)) * 2).astype(np.float16)
    ids = np.sort(rng.integers(0, 60, n))
    cut = int(np.searchsorted(ids, ids[n // 2]))  # a sample boundary: samples lie in one block
    plan, target = _plan(d, 24, threads=threads, batch_rows=64)
    monkeypatch.setattr(F, "_per_sample_rf_fast", F._per_sample_rf_tiled)  # side_block runs the tiled path
    whole = _side(plan, target, x, ids)
    halves = _side(plan, target, x[:cut], ids[:cut]).merge(_side(plan, target, x[cut:], ids[cut:]))
    monkeypatch.setattr(F, "_per_sample_rf_fast", F._per_sample_rf_reference)
    ref = _side(plan, target, x, ids)
    for name in ("rf_KC2D", "rfself_KCD"):
        _assert_close(getattr(halves, name), getattr(whole, name))
        _assert_close(getattr(whole, name), getattr(ref, name))
    assert whole.rf_KC2D.any()


def test_threads_of_a_plan_default_to_one():
    """The analysis's dask workers run one task per core: one call uses one thread unless asked."""
    plan, _ = _plan(4, 8)
    assert plan.threads == 1 and dataclasses.replace(plan, threads=2).threads == 2


def test_power_of_two_needs_the_same_exact_factor_in_every_entry():
    """A shared argument only when ``a == b * 2**k`` holds exactly in every entry."""
    b = np.array([0.3, 1.7, 2.9])
    assert F._power_of_two(b * 4, b) == 4.0 and F._power_of_two(b / 2, b) == 0.5
    a = b * 4
    a[2] = np.nextafter(a[2], 0)
    assert F._power_of_two(a, b) is None, "one entry off by an ulp: not the same bits"
    assert F._power_of_two(b * 3, b) is None and F._power_of_two(b * 6, b) is None
