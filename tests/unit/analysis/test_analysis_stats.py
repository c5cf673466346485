"""p-values and intervals: calibration on null data, power on a shift, coverage on replicates."""

import numpy as np
import pytest
from scipy import stats as sps

from kscale.analysis import stats
from kscale.analysis.features import plain_sums, single_target_plan
from kscale.analysis.mmd import jackknife_se, mmd2_leave_one_out, rf_mmd2, rf_side

D_FREQ, DIM = 64, 4


def sequences(rng, n_seq, per_seq, shift, effect=0.5):
    """Tokens grouped in sequences sharing a random effect (so tokens are not independent)."""
    eff = effect * rng.standard_normal((n_seq, DIM))
    x = np.repeat(eff, per_seq, 0) + rng.standard_normal((n_seq * per_seq, DIM))
    x[:, 0] += shift
    return x


def sums_pair(x, y, per_seq, n_buckets=16, seed=0, collect=False):
    n_x = len(x) // per_seq
    sid = np.repeat(np.arange(n_x + len(y) // per_seq), per_seq)
    plan = single_target_plan(DIM, n_features=D_FREQ, bandwidth=2.0, sample_ids=sid, seed=seed,
                              n_buckets=n_buckets, max_units=10**6 if collect else 0)
    return plain_sums(x, sid[: len(x)], plan), plain_sums(y, sid[len(x):], plan), plan


def side(s):
    return rf_side(s.count_K, s.rf_KC2D[:, 0], s.rfself_KCD[:, 0], s.nsq_K)


def unit_test_inputs(sx, sy):
    feats, counts, is_x = [], [], []
    for s, flag in ((sx, True), (sy, False)):
        _, rf_U2D, count_U = s.units()  # token-level statistic (default pairs_U)
        feats.append(rf_U2D.reshape(len(count_U), -1) / np.sqrt(D_FREQ))
        counts.append(count_U)
        is_x.append(np.full(len(count_U), flag))
    c = np.concatenate(counts)
    return np.vstack(feats), c, c, np.concatenate(is_x)


def test_permutation_statistic_matches_streaming_value_and_detects_shift():
    rng = np.random.default_rng(0)
    x, y = sequences(rng, 40, 10, 0.0), sequences(rng, 40, 10, 0.6)
    sx, sy, _ = sums_pair(x, y, 10, collect=True)
    p, observed = stats.permutation_p(*unit_test_inputs(sx, sy), 999, seed=1)
    value, _ = rf_mmd2(side(sx), side(sy), estimator="token")
    assert observed == pytest.approx(value, rel=1e-10)
    assert p < 0.01
    feat, count, _, is_x = unit_test_inputs(sx, sy)
    _, block_observed = stats.permutation_p(feat, count, (feat**2).sum(1), is_x, 9, seed=1, pairs_U=count**2)
    assert block_observed == pytest.approx(rf_mmd2(side(sx), side(sy))[0], rel=1e-10)
    p_cross, _ = stats.cross_mmd_p(side(sx), side(sy), np.arange(16) % 2)
    assert p_cross < 0.01


def test_cross_mmd_roughly_calibrated_on_null():
    rng = np.random.default_rng(1)
    pvals = []
    for r in range(300):
        sx, sy, _ = sums_pair(sequences(rng, 48, 8, 0.0), sequences(rng, 48, 8, 0.0), 8, seed=r)
        x, y = side(sx), side(sy)
        pvals.append(stats.cross_mmd_p(x, y, np.arange(16) % 2)[0])
    rate = np.mean(np.asarray(pvals) <= 0.05)
    assert 0.02 <= rate <= 0.09, rate
    assert sps.kstest(pvals, "uniform").pvalue > 0.01


def _permutation_p(feat_UF, n_perm, seed=0):
    """p of units with one token each, the first half on side x (token-level statistic)."""
    count_U = np.ones(len(feat_UF))
    is_x = np.arange(len(feat_UF)) < len(feat_UF) // 2
    return stats.permutation_p(feat_UF, count_U, (feat_UF**2).sum(1), is_x, n_perm, seed=seed)[0]


@pytest.mark.parametrize("n_perm", [1, 9, 250, 251])
def test_permutation_p_is_one_plus_exceedances_over_one_plus_permutations(n_perm):
    """p = (1 + #{T* >= T}) / (1 + n_perm), pinned where the count is known without the sampler: two
    separated groups of 20 units (only the observed labelling and its mirror, 2 of C(40, 20) ~ 1.4e11,
    reach T, so #{T* >= T} = 0 and p = 1 / (1 + n_perm), never 0), and identical units (every T* equals T
    exactly in float arithmetic on integer features, all count: p = 1)."""
    separated = np.repeat([[1.0, 0.0], [0.0, 1.0]], 20, axis=0)
    assert _permutation_p(separated, n_perm) == 1 / (1 + n_perm)
    assert _permutation_p(np.ones((40, 2)), n_perm) == 1.0


@pytest.mark.parametrize("units", [6, 40])
def test_permutation_p_valid_on_planted_null(units):
    """Under a planted null (exchangeable units) P(p <= a) <= a at every level: the fast counterpart of the
    slow nominal-rate test. 2,000 tests of 9 permutations each (~0.5 s). With 6 units the observed
    labelling and its mirror are drawn 1 time in 10, so a count that leaves ties out (``>``) rejects at
    ~0.2 where a = 0.11; ``exceed / n_perm`` rejects at 0.2 where a = 1/9 (U = 40: the rank is uniform)."""
    rng = np.random.default_rng(7)
    reps = 2000
    pvals = np.array([_permutation_p(rng.standard_normal((units, 3)), 9, seed=r) for r in range(reps)])
    for a in np.concatenate([np.arange(1, 20) / 20, np.arange(1, 9) / 9]):  # 0.05 .. 0.95 and each k / 9
        rate = np.mean(pvals <= a)
        assert rate <= a + 4 * np.sqrt(a * (1 - a) / reps), (units, a, rate)


@pytest.mark.slow
def test_sequence_permutation_rejects_at_nominal_rate_on_null():
    rng = np.random.default_rng(2)
    rejections = []
    for r in range(2000):
        sx, sy, _ = sums_pair(sequences(rng, 20, 10, 0.0), sequences(rng, 20, 10, 0.0), 10, seed=r,
                              collect=True)
        p, _ = stats.permutation_p(*unit_test_inputs(sx, sy), 199, seed=r)
        rejections.append(p <= 0.05)
    assert 0.04 <= np.mean(rejections) <= 0.06, np.mean(rejections)


def population_rf_mmd2(plan, mean_x, mean_y, var):
    """Population MMD^2 of the fixed random-feature kernel between N(mean_x, var I), N(mean_y, var I):
    E cos(w.x) = exp(-var |w|^2 / 2) cos(w.mu), E sin(w.x) = exp(-var |w|^2 / 2) sin(w.mu)."""
    w_Dd = plan.freqs.directions_Dd * (plan.freqs.radii["rbf"] / 2.0)[:, None]
    damp = np.exp(-var * (w_Dd**2).sum(1) / 2)
    emb = lambda mu: np.concatenate([damp * np.cos(w_Dd @ mu), damp * np.sin(w_Dd @ mu)]) / np.sqrt(len(damp))
    diff = emb(mean_x) - emb(mean_y)
    return float(diff @ diff)


def test_jackknife_interval_coverage_near_nominal():
    rng = np.random.default_rng(3)
    covered = []
    effect = 0.5
    for r in range(300):
        x, y = sequences(rng, 60, 10, 0.0, effect), sequences(rng, 60, 10, 0.8, effect)
        sx, sy, plan = sums_pair(x, y, 10, n_buckets=32, seed=7)
        sides = side(sx), side(sy)
        value, _ = rf_mmd2(*sides)
        nonempty = (sides[0].n_K + sides[1].n_K) > 0
        se = jackknife_se(mmd2_leave_one_out(*sides), nonempty)
        lo, hi = stats.t_interval(value, se, int(nonempty.sum()), 0.05)
        shift = np.zeros(DIM)
        shift[0] = 0.8
        truth = population_rf_mmd2(plan, np.zeros(DIM), shift, 1 + effect**2)
        covered.append(lo <= truth <= hi)
    assert 0.90 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_fieller_interval_matches_delta_method_when_denominator_is_precise():
    lo, hi = stats.fieller_interval(10.0, 2.0, 0.04, 1e-8, 0.0, 0.05)
    z = sps.norm.ppf(0.975)
    assert lo == pytest.approx(5 - z * 0.1, rel=1e-4) and hi == pytest.approx(5 + z * 0.1, rel=1e-4)
    assert stats.fieller_interval(1.0, 0.01, 0.01, 0.01, 0.0, 0.05) == (-np.inf, np.inf)
