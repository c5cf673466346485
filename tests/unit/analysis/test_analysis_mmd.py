"""MMD^2 estimators against closed forms and direct computations."""

import numpy as np
import pytest
from analysis_fakes import gaussian_mmd2, sobol_gaussian
from scipy.spatial.distance import cdist

from kscale.analysis.features import plain_sums, single_target_plan
from kscale.analysis.mmd import exact_mmd2, median_bandwidth, rf_mmd2, rf_side


def rf_value(x, y, *, bandwidth, n_features, orthogonal=True, seed=0, kernel="rbf", dtype="float32",
             chunk=None, order=None):
    """RF MMD^2 and approx SD of two (n, d) arrays, streamed in chunks merged in ``order``."""
    sid = np.arange(len(x) + len(y))
    plan = single_target_plan(x.shape[1], n_features=n_features, bandwidth=bandwidth, sample_ids=sid,
                              kernels=(kernel,), orthogonal=orthogonal, seed=seed, dtype=dtype)
    sides = []
    for arr, ids in ((x, sid[: len(x)]), (y, sid[len(x):])):
        chunk_ = chunk or len(arr)
        parts = [(lo, arr[lo:lo + chunk_], ids[lo:lo + chunk_]) for lo in range(0, len(arr), chunk_)]
        if order is not None:
            parts = [parts[i] for i in np.random.default_rng(order).permutation(len(parts))]
        acc = None
        for _, a, i in parts:
            s = plain_sums(a, i, plan)
            acc = s if acc is None else acc.merge(s)
        sides.append(rf_side(acc.count_K, acc.rf_KC2D[:, 0], acc.rfself_KCD[:, 0], acc.nsq_K))
    return rf_mmd2(*sides)  # one token per sample: block and token-level agree


def test_exact_matches_gaussian_closed_form():
    m1, m2 = np.zeros(3), np.array([1.5, 0.0, 0.0])
    s1, s2 = np.eye(3), np.diag([1.0, 1.5, 0.7])
    bw = 1.5
    x = sobol_gaussian(8192, m1, s1, seed=1)
    y = sobol_gaussian(8192, m2, s2, seed=2)
    got = exact_mmd2(x, y, [("rbf", bw)], biased=True, block=2048).value_k[0]
    truth = gaussian_mmd2(m1, s1, m2, s2, bw)
    assert got == pytest.approx(truth, rel=1e-3)


@pytest.mark.parametrize("biased", [False, True])
def test_exact_equals_cdist(biased):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(310, 6)), rng.normal(0.3, 1.2, size=(257, 6))
    n, m = len(x), len(y)
    kernels = [("rbf", 1.7), ("laplacian", 2.3), ("rbf", 0.8)]
    got = exact_mmd2(x, y, kernels, biased=biased, block=100).value_k
    for (kernel, bw), g in zip(kernels, got):
        f = (lambda d: np.exp(-(d**2) / (2 * bw**2))) if kernel == "rbf" else (lambda d: np.exp(-d / bw))
        kxx, kyy, kxy = f(cdist(x, x)), f(cdist(y, y)), f(cdist(x, y))
        if biased:
            ref = kxx.mean() + kyy.mean() - 2 * kxy.mean()
        else:
            ref = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2 * kxy.mean())
        assert g == pytest.approx(ref, rel=1e-10, abs=1e-13)


def test_rf_sums_equal_explicit_feature_gram():
    """The sum formula equals the U-statistic of the explicit feature Gram matrix (float64)."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(200, 5)), rng.normal(0.5, 1, size=(150, 5))
    value, _ = rf_value(x, y, bandwidth=1.3, n_features=64, dtype="float64", chunk=37)
    plan = single_target_plan(5, n_features=64, bandwidth=1.3, sample_ids=np.arange(1))
    w_Dd = plan.freqs.directions_Dd * (plan.freqs.radii["rbf"] / 1.3)[:, None]
    feat = lambda a: np.hstack([np.cos(a @ w_Dd.T), np.sin(a @ w_Dd.T)]) / np.sqrt(64)
    fx, fy = feat(x), feat(y)
    gxx, gyy = fx @ fx.T, fy @ fy.T
    ref = ((gxx.sum() - np.trace(gxx)) / (200 * 199) + (gyy.sum() - np.trace(gyy)) / (150 * 149)
           - 2 * (fx @ fy.T).mean())
    assert value == pytest.approx(ref, rel=1e-10)


def test_rf_within_its_approximation_sd_of_exact():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(1500, 16)), rng.normal(size=(1500, 16))
    y[:, :3] += 0.7
    bw = median_bandwidth(np.vstack([x, y]))
    for kernel in ("rbf", "laplacian"):
        exact = exact_mmd2(x, y, [(kernel, bw)]).value_k[0]
        for seed in range(3):
            for orthogonal in (True, False):
                value, sd = rf_value(x, y, bandwidth=bw, n_features=1024, orthogonal=orthogonal,
                                     seed=seed, kernel=kernel)
                assert abs(value - exact) <= 4 * sd, (kernel, seed, orthogonal, value, exact, sd)
                assert sd < 0.2 * exact


def test_orthogonal_frequencies_beat_plain():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(800, 32)), rng.normal(size=(800, 32))
    y[:, 0] += 1.0
    bw = median_bandwidth(np.vstack([x, y]))
    exact = exact_mmd2(x, y, [("rbf", bw)]).value_k[0]
    err = {o: [abs(rf_value(x, y, bandwidth=bw, n_features=256, orthogonal=o, seed=s)[0] - exact)
               for s in range(16)] for o in (True, False)}
    assert np.sqrt(np.mean(np.square(err[True]))) < 0.8 * np.sqrt(np.mean(np.square(err[False])))


def test_merge_invariance_across_chunkings_and_orders():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(3000, 12)), rng.normal(0.05, 1, size=(2500, 12))
    ref, _ = rf_value(x, y, bandwidth=4.0, n_features=512)
    for chunk, order in [(1000, None), (333, 1), (97, 2), (2048, 3)]:
        value, _ = rf_value(x, y, bandwidth=4.0, n_features=512, chunk=chunk, order=order)
        assert value == pytest.approx(ref, rel=1e-9)
