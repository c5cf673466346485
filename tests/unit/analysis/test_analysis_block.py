"""Sample-block estimators on a planted null with strong within-sample correlation.

Tokens of a sample share a random effect, so pairs within a sample are closer than pairs across
samples. Both halves (intra) or both modalities (cross) come from one distribution: the true MMD^2 is 0.
The sample-block U-statistic (pairs within a sample left out) must be centred on 0 with intervals that
cover; the token-level one, on the same data, is visibly biased.
"""

import numpy as np
import pytest

from kscale.analysis import rows as R
from kscale.analysis.features import ChunkPlan, FeatureConfig, TargetPlan, chunk_sums, draw_frequencies
from kscale.analysis.mmd import exact_parts, jackknife_se
from kscale.analysis.plan import comparisons
from kscale.analysis.source import Buckets

DIM, N_SAMPLES, K, REPS = 4, 60, 16, 40
CONFIG = FeatureConfig("none", "rbf", 1.0)


def null_tokens(rng, effect=1.2, rho=0.5):
    """Image and text tokens of N_SAMPLES samples: a sample's tokens share an effect, and its image and
    text effects are correlated (rho); every token has the same marginal distribution."""
    eff = effect * rng.standard_normal((N_SAMPLES, DIM))
    text_eff = rho * eff + np.sqrt(1 - rho**2) * effect * rng.standard_normal((N_SAMPLES, DIM))
    out = {}
    for mod, e in (("image", eff), ("text", text_eff)):
        n_s = rng.integers(4, 16, N_SAMPLES)
        ids = np.repeat(np.arange(N_SAMPLES) * 3 + 1, n_s)
        out[mod] = (np.repeat(e, n_s, 0) + rng.standard_normal((n_s.sum(), DIM)), ids)
    return out


def plan(seed):
    target = TargetPlan(heads=[0], bandwidth={"none": 2.5}, centre_d=np.zeros(DIM), scale_d=np.ones(DIM))
    return ChunkPlan(draw_frequencies(DIM, 256, orthogonal=True, seed=seed), [CONFIG], [], {0: target},
                     Buckets(K, seed), "float64")


def rf_row(tokens, comp_name, estimator, seed):
    ts = chunk_sums({m: (x[:, None, :], ids) for m, (x, ids) in tokens.items()}, plan(seed))[0]
    ctx = R.Context("mem", 0, 0, 0.05, {comp_name: N_SAMPLES}, estimator, "per_target", seed)
    comp = comparisons([comp_name], "image")[0]
    rows, _ = R.rf_rows(ctx, ts, comp, [CONFIG], {"none": 2.5}, {})
    return rows[0]


def exact_value(tokens, comp_name, estimator, seed):
    comp = comparisons([comp_name], "image")[0]
    buckets = Buckets(K, seed)
    sides = []
    for side, mod in (("x", comp.mod_x), ("y", comp.mod_y)):
        x, ids = tokens[mod]
        keep = comp.mask(side, buckets.of(ids))
        sides.append((x[keep], ids[keep], buckets.of(ids[keep])))
    (x, ix, bx), (y, iy, by) = sides
    res = exact_parts(x, y, [("rbf", 2.5)], ids_x=ix, ids_y=iy, bucket_x=bx, bucket_y=by, n_buckets=K,
                      estimator=estimator)
    se = jackknife_se(res.loo_kK[0], res.nonempty_K)
    return {"value": float(res.value_k[0]), "se": se}


def replicate(fn, comp_name, estimator):
    """(mean over replicates, its SE, share of 95% intervals covering the true 0)."""
    values, covered = [], []
    for r in range(REPS):
        out = fn(null_tokens(np.random.default_rng(1000 + r)), comp_name, estimator, r)
        values.append(out["value"])
        covered.append(abs(out["value"]) <= 2.13 * out["se"])  # t_{15, 0.975}: 16 buckets
    values = np.asarray(values)
    return values.mean(), values.std(ddof=1) / np.sqrt(REPS), np.mean(covered)


@pytest.mark.parametrize("comp_name", ["intra_text", "intra_image", "cross"])
@pytest.mark.parametrize("fn", [rf_row, exact_value], ids=["random_features", "exact"])
def test_block_estimator_is_centred_and_covers_token_level_is_biased(fn, comp_name):
    """Centred: the replicate mean within 2 of its SEs (an unbiased estimator misses 1 SE a third of the
    time); the token-level mean is more than 5 of the block's SEs away, and its own SE."""
    mean, se_mean, coverage = replicate(fn, comp_name, "block")
    assert abs(mean) <= 2 * se_mean, (mean, se_mean)
    assert 0.85 <= coverage, coverage
    t_mean, t_se, _ = replicate(fn, comp_name, "token")
    assert abs(t_mean) > 5 * t_se and abs(t_mean) > 5 * se_mean, (t_mean, t_se, se_mean)


def test_kept_per_sample_sums_hold_only_the_primary_config():
    """The per-sample sums kept for permutations are the first config's only, not views that keep every
    config's (S, C, 2, D) block alive in the driver's accumulator (its memory grew with the blocks)."""
    configs = [FeatureConfig("none", k, m) for k in ("rbf", "laplacian") for m in (0.5, 1.0, 2.0)]
    target = TargetPlan(heads=[0], bandwidth={"none": 2.0}, centre_d=np.zeros(4), scale_d=np.ones(4))
    plan = ChunkPlan(draw_frequencies(4, 16, orthogonal=True, seed=0), configs, [], {0: target}, Buckets(4, 0),
                     max_units=100)
    rng = np.random.default_rng(0)
    item = {m: (rng.standard_normal((30, 1, 4)), np.repeat(np.arange(10), 3)) for m in ("image", "text")}
    for sums in chunk_sums(item, plan)[0].by_mod.values():
        (rf,) = sums.unit_rf
        assert rf.shape == (10, 2, 16) and rf.base is None
