"""Random-feature MMD^2 against the exact MMD^2 with a fixed relative bound, and a sampler that must fail it.

The analysis streams random-feature sums (``kscale.analysis.features``) instead of the O(n^2) kernel
matrix; its own approximation SD shrinks like D^-1/2 but is computed from the same features, so it cannot
show a biased sampler. Here the bound is fixed in advance: at D = 1024 features, on 1,500 + 1,500 points in
16 dimensions with a shift in 3 of them (exact MMD^2 about 0.026 at the median bandwidth), every seed and
both samplers (orthogonal, plain) stay within ``REL_BOUND`` of the exact value; the largest error seen over
8 draws was 5.7 %. Frequencies whose radii are drawn 25 % too long (the kernel of a shorter bandwidth: a
plausible slip in ``draw_frequencies`` or ``rf_scale``) must violate the same bound.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kscale.analysis.features import chunk_sums, single_target_plan
from kscale.analysis.mmd import exact_mmd2, median_bandwidth, rf_mmd2, rf_side

N_FEATURES = 1024
REL_BOUND = 0.08


@pytest.fixture(scope="module")
def shifted():
    """(x, y, bandwidth, exact rbf MMD^2_u)."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(1500, 16)), rng.normal(size=(1500, 16))
    y[:, :3] += 0.7
    bw = median_bandwidth(np.vstack([x, y]))
    return x, y, bw, exact_mmd2(x, y, [("rbf", bw)]).value_k[0]


def _rf_mmd2(x: np.ndarray, y: np.ndarray, bw: float, *, seed: int, orthogonal: bool,
             radius_factor: float = 1.0) -> float:
    sid = np.arange(len(x) + len(y))
    plan = single_target_plan(x.shape[1], n_features=N_FEATURES, bandwidth=bw, sample_ids=sid, seed=seed,
                              orthogonal=orthogonal)
    if radius_factor != 1.0:  # the biased sampler
        f = plan.freqs
        plan = dataclasses.replace(plan, freqs=dataclasses.replace(
            f, radii={k: r * radius_factor for k, r in f.radii.items()}))
    sides = []
    for arr, ids in ((x, sid[: len(x)]), (y, sid[len(x):])):
        sums = chunk_sums({"x": (arr[:, None, :], ids), "y": None}, plan)[0].by_mod["x"]
        sides.append(rf_side(sums.count_K, sums.rf_KC2D[:, 0], sums.rfself_KCD[:, 0], sums.nsq_K))
    return rf_mmd2(*sides, None, "token")[0]  # one token per sample: the i != j U-statistic of exact_mmd2


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "plain"])
@pytest.mark.parametrize("seed", [0, 1])
def test_rf_within_fixed_relative_bound_of_exact(shifted, seed, orthogonal) -> None:
    x, y, bw, exact = shifted
    rel = abs(_rf_mmd2(x, y, bw, seed=seed, orthogonal=orthogonal) - exact) / exact
    assert rel < REL_BOUND, (seed, orthogonal, rel)


@pytest.mark.parametrize("seed", [0, 1])
def test_biased_frequency_sampler_violates_the_bound(shifted, seed) -> None:
    """The bound has power: radii 25 % too long move the estimate outside it, for every seed."""
    x, y, bw, exact = shifted
    rel = abs(_rf_mmd2(x, y, bw, seed=seed, orthogonal=True, radius_factor=1.25) - exact) / exact
    assert rel > REL_BOUND, (seed, rel)
