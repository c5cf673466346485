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

from kscale.analysis.features import chunk_sums, plain_sums, single_target_plan
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


# --- kernel values against the closed form, with Hoeffding's bound at the feature count --------------------
#
# The MMD comparison above cannot see a Laplacian slip: on that data the exact Laplacian MMD^2 moves only 3 %
# when the bandwidth shrinks by 1.25, inside the RF noise. Single kernel values can: k_hat(x, y) is the mean
# of D terms cos(w_j.(x - y)) in [-1, 1] with expectation exp(-|x-y|/s) (laplacian) or exp(-|x-y|^2/2s^2)
# (rbf), so by Hoeffding each of P pairs is within sqrt(2 ln(2P/delta) / D) of it with probability 1 - delta
# overall (independent frequencies; orthogonal blocks only lower the variance). At D = 16,384, P = 64,
# delta = 1e-6 the bound is 0.048; the largest error seen over 5 seeds was 0.016. Radii 25 % too long give
# exp(-1.25 r/s) instead, off by up to 0.082 near r = 0.9 s (0.17 for rbf): every seed exceeded 0.079.

KERNEL_FEATURES, KERNEL_PAIRS, KERNEL_DELTA, KERNEL_BW = 16384, 64, 1e-6, 2.0


def _kernel_errors(kernel: str, *, seed: int, orthogonal: bool, radius_factor: float = 1.0) -> np.ndarray:
    """|k_hat - k| for pairs at distances 0.1 s .. 3 s, k_hat from the per-sample features of chunk sums."""
    rng = np.random.default_rng(11)
    d = 16
    x = rng.normal(size=(KERNEL_PAIRS, d))
    u = rng.normal(size=(KERNEL_PAIRS, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    y = x + u * (np.linspace(0.1, 3.0, KERNEL_PAIRS) * KERNEL_BW)[:, None]
    ids = np.arange(2 * KERNEL_PAIRS)
    plan = single_target_plan(d, n_features=KERNEL_FEATURES, bandwidth=KERNEL_BW, sample_ids=ids, seed=seed,
                              orthogonal=orthogonal, kernels=(kernel,), max_units=len(ids))
    if radius_factor != 1.0:  # the biased sampler
        f = plan.freqs
        plan = dataclasses.replace(plan, freqs=dataclasses.replace(
            f, radii={k: r * radius_factor for k, r in f.radii.items()}))
    _, rf_U2D, _ = plain_sums(np.vstack([x, y]), ids, plan).units()  # one token per sample: cos, sin of w.x
    k_hat = (rf_U2D[:KERNEL_PAIRS] * rf_U2D[KERNEL_PAIRS:]).sum((1, 2)) / KERNEL_FEATURES
    r = np.linalg.norm(x - y, axis=1)
    exact = np.exp(-r / KERNEL_BW) if kernel == "laplacian" else np.exp(-(r**2) / (2 * KERNEL_BW**2))
    return np.abs(k_hat - exact)


def _hoeffding_bound() -> float:
    return float(np.sqrt(2 * np.log(2 * KERNEL_PAIRS / KERNEL_DELTA) / KERNEL_FEATURES))


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "plain"])
@pytest.mark.parametrize("kernel", ["laplacian", "rbf"])
def test_rf_kernel_values_within_hoeffding_bound(kernel, orthogonal) -> None:
    err = _kernel_errors(kernel, seed=3, orthogonal=orthogonal)
    assert err.max() < _hoeffding_bound(), (kernel, orthogonal, err.max(), _hoeffding_bound())


@pytest.mark.parametrize("kernel", ["laplacian", "rbf"])
def test_long_radii_violate_the_kernel_bound(kernel) -> None:
    """The bound has power: radii 25 % too long put some pair outside it."""
    err = _kernel_errors(kernel, seed=3, orthogonal=True, radius_factor=1.25)
    assert err.max() > _hoeffding_bound(), (kernel, err.max())
