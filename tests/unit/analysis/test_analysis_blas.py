"""The analysis driver runs BLAS on one thread (``kscale.analysis.blas``), and the exact and paper MMD² rows are
still the bits they were with the process's own BLAS threads.

Reference: the same rows computed with no limit at all. The points are 557 per side in 16 dimensions, the
demo's cross comparison, a shape for which this machine's OpenBLAS gives some distance entries other bits
on one thread than on two: the test then fails if ``rows.exact_rows`` or ``rows.paper_rows`` drop their
``blas.as_started()``. (On a machine where the two agree it can only check that the rows are equal.)
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd

from kscale.analysis import blas
from kscale.analysis import rows as R
from kscale.analysis.features import TargetPlan
from kscale.analysis.plan import Subsample, comparisons
from kscale.spec.analyze import AnalyzeConfig
from tests.testing_utils import require_module

INSTALL = "pip install threadpoolctl (it comes with scikit-learn)"


def _threads() -> list[int]:
    tpc = require_module("threadpoolctl", INSTALL)
    return [lib.num_threads for lib in tpc.ThreadpoolController().select(user_api="blas").lib_controllers]


def test_one_thread_inside_the_started_counts_in_as_started_and_after():
    before = _threads()
    assert before, "no BLAS library found"
    with blas.single_thread():
        assert _threads() == [1] * len(before)
        with blas.as_started():
            assert _threads() == before
        assert _threads() == [1] * len(before)
    assert _threads() == before
    with blas.as_started():  # outside single_thread: nothing to give back, nothing changed
        assert _threads() == before


def _demo_like(n: int = 557, d: int = 16) -> Subsample:
    """Image and text keys with some exact twins across the sides (other samples), as the demo's fp16 keys
    have: a square root of a near-zero squared distance shows the last bits of its product."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    y[540:] = x[540:]  # rows of the shape's edge tiles, where OpenBLAS's one-thread kernel differs here
    ids = np.sort(rng.integers(0, 64, n))
    return Subsample({"image": x[:, None], "text": y[:, None]}, {"image": ids, "text": 63 - ids},
                     {"image": (ids * 7) % 32, "text": ((63 - ids) * 7) % 32})


def _rows(sub: Subsample) -> pd.DataFrame:
    cfg = AnalyzeConfig(stores=["unused"])  # the default kernels, normalisations and multiples
    ctx = R.Context("store", 0, 0, 0.05, {"cross": 64}, "block", "per_target", 0)
    comp = comparisons(["cross"], "image")[0]
    plan = TargetPlan(heads=[0], bandwidth={"none": 5.3, "l2": 1.3, "standardize": 5.6},
                      centre_d=np.full(16, 0.1), scale_d=np.full(16, 1.05))
    rows = R.exact_rows(ctx, sub, comp, [0], cfg, plan, {}) + R.paper_rows(ctx, sub, comp, [0], 2000, cfg.paper_mode)
    return pd.DataFrame(rows)


def test_exact_and_paper_rows_are_the_bits_of_the_started_thread_count():
    _threads()
    sub = _demo_like()
    want = _rows(sub)
    with blas.single_thread():
        got = _rows(sub)
    assert len(want) == 3 * 6 + 1
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_without_as_started_these_rows_would_differ_here(monkeypatch):
    """Not a guarantee of kscale: what makes the test above able to fail on this kind of machine (2 cores,
    numpy's OpenBLAS): the same rows with the exact path left on one thread are other bits. Where BLAS has
    one thread anyway there is nothing to tell apart."""
    if max(_threads()) < 2:
        return
    sub = _demo_like()
    want = _rows(sub)
    monkeypatch.setattr(R, "as_started", contextlib.nullcontext)
    with blas.single_thread():
        got = _rows(sub)
    assert not got.equals(want)
