"""p-values of the rows other than the random-feature ones (issue 23): histogram JSD, classifier bounds, exact
and paper MMD, ratios. Each test is calibrated on a planted null and has power on a planted shift; the
scalable ones (histogram, classifier) at 2·10^5 samples per replicate from synthetic per-bucket sums, as
``test_significance_scale.py`` does for the random-feature rows (a finite, swap-symmetric population of
samples with dependent tokens and heavy-tailed, side-dependent token counts; Poisson copies per bucket).
The exact-kernel test runs on the bounded subsample the exact rows use, so its replicates are subsamples.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from scipy import stats as sps

from kscale.analysis import rows as R
from kscale.analysis import stats
from kscale.analysis.jsd import balanced_log_loss
from kscale.analysis.plan import Subsample, comparisons
from kscale.analysis.probes import heldout_stats
from kscale.spec.analyze import AnalyzeConfig, MMDConfig, SignificanceConfig

K, DIM, N_SAMPLES, ATOMS = 32, 3, 200_000, 150
COMPS = {c.name: c for c in comparisons(["cross", "intra_text", "intra_image"], "image")}


def _atoms(seed: int, shift: float):
    """Per-atom token sets of both sides (x long, y short), swap-symmetric before the shift of x's 1st coordinate."""
    rng = np.random.default_rng([seed, 0xA71])
    effect = 0.7 * rng.standard_normal((ATOMS, DIM))
    n_a, n_b = rng.geometric(1 / 30, ATOMS), rng.geometric(1 / 8, ATOMS)
    a = [e + rng.standard_normal((n, DIM)) for e, n in zip(effect, n_a)]
    b = [e + rng.standard_normal((n, DIM)) for e, n in zip(effect, n_b)]
    step = np.zeros(DIM)
    step[0] = shift
    return [t + step for t in a + b], b + a


def _bucket_counts(rng, n_atoms: int) -> np.ndarray:
    return rng.poisson(N_SAMPLES / (K * n_atoms), (K, n_atoms)).astype(float)


def _rate_checks(p: np.ndarray) -> None:
    reps = len(p)
    assert abs(np.mean(p <= 0.05) - 0.05) <= 4 * np.sqrt(0.05 * 0.95 / reps), np.mean(p <= 0.05)
    assert np.mean(p <= 0.01) <= 0.01 + 4 * np.sqrt(0.01 * 0.99 / reps), np.mean(p <= 0.01)
    assert sps.kstest(p, "uniform").pvalue > 1e-3


# --- histogram JSD: the cross-fit test of the bin frequencies ------------------------------------------------

EDGES = np.array([-1.0, -0.3, 0.3, 1.0])  # 5 bins per column; columns are the coordinates


def _hist(tokens_nd: np.ndarray) -> np.ndarray:
    """(P, B) bin counts of a token set, one column per coordinate."""
    b = np.stack([np.searchsorted(EDGES, tokens_nd[:, j], side="right") for j in range(DIM)])
    return np.stack([np.bincount(row, minlength=len(EDGES) + 1) for row in b]).astype(float)


def hist_population(seed: int, shift: float):
    xs, ys = _atoms(seed, shift)
    return np.array([_hist(t) for t in xs]), np.array([_hist(t) for t in ys])


def hist_row_p(pop, comp_name: str, reps: int, seed: int) -> np.ndarray:
    """p of ``reps`` replicates as ``rows.hist_rows`` makes it (its sides, then ``rows.hist_p``); the row's own
    jackknife is left out for speed (``test_hist_rows_carry_the_p_of_hist_p`` checks the row carries this p)."""
    hx, hy = pop
    comp = COMPS[comp_name]
    rng = np.random.default_rng([seed, 0x415])
    P, B = hx.shape[1:]
    hx, hy = hx.reshape(len(hx), -1), hy.reshape(len(hy), -1)
    out = []
    for _ in range(reps):
        c_KM = _bucket_counts(rng, len(hx))
        x, y = R.hist_sides(_hist_sums((c_KM @ hx).reshape(K, P, B), (c_KM @ hy).reshape(K, P, B)), comp)
        out.append(R.hist_p(x, y, np.arange(DIM), comp, "marginal")["p"])
    return np.asarray(out)


def _hist_sums(image_KPB: np.ndarray, text_KPB: np.ndarray) -> SimpleNamespace:
    """The part of ``features.TargetSums`` the histogram rows read."""
    return SimpleNamespace(ncross_K=np.zeros(K), by_mod={"image": SimpleNamespace(hist_KPB=image_KPB),
                                                        "text": SimpleNamespace(hist_KPB=text_KPB)})


def test_hist_rows_carry_the_p_of_hist_p():
    rng = np.random.default_rng(3)
    ts = _hist_sums(rng.poisson(5.0, (K, 4, 6)).astype(float), rng.poisson(5.0, (K, 4, 6)).astype(float) + 0.5)
    ctx = R.Context("s", 0, -1, 0.05, {"cross": 1, "intra_text": 1}, "block", "median", 0)
    for name in ("cross", "intra_text"):
        row = R.hist_rows(ctx, ts, COMPS[name], {"marginal": np.arange(4)}, "nats", {})[0]
        want = R.hist_p(*R.hist_sides(ts, COMPS[name]), np.arange(4), COMPS[name], "marginal")
        assert row["p_method"] == "cross_hist_t" and row["p"] == want["p"] and np.isfinite(row["p"])
        assert json.loads(row["conventions"])["p"] == R.HIST_P


def test_histogram_jsd_p_rejects_at_the_nominal_rate_on_a_planted_null_at_2e5_samples():
    """1,000 replicates each of cross and intra_text. Giving the intra test both halves' full histograms (the
    parity masks of ``hist_rows`` dropped) makes the sides identical: p = 0.5 always, caught here."""
    pop = hist_population(1, 0.0)
    for comp in ("cross", "intra_text"):
        _rate_checks(hist_row_p(pop, comp, 1000, seed=2))


def test_histogram_jsd_p_has_power_on_a_planted_shift_at_2e5_samples():
    """A shift of 0.025 (2.5% of a token's SD) in one coordinate: most replicates reject (a reversed tail fails)."""
    p = hist_row_p(hist_population(1, 0.025), "cross", 200, seed=3)
    assert np.mean(p <= 0.05) >= 0.8, np.mean(p <= 0.05)


def test_lda_histogram_rows_say_why_they_have_no_p():
    comp = COMPS["cross"]
    ctx = R.Context("s", 0, -1, 0.05, {"cross": 1}, "block", "median", 0)
    h = np.ones((K, 2, 4))
    row = R.hist_rows(ctx, _hist_sums(h, h), comp, {"lda:cross": np.array([1])}, "nats", {})[0]
    assert row["p"] is None and row["p_method"] == "none_fitted_direction"
    assert json.loads(row["conventions"])["p"] == R.LDA_P


# --- classifier bound: one-sided t of log 2 - held-out loss ---------------------------------------------------

def clf_population(seed: int, scale: float, shift: float):
    """Per-atom held-out log-loss sums of a fixed probe with logit scale * u, u a token's 1st coordinate: x tokens
    are scored with label 1 (softplus(-l)), y tokens with label 0 (softplus(l))."""
    xs, ys = _atoms(seed, shift)
    sp = lambda v: np.logaddexp(0.0, v)  # noqa: E731
    lx = np.array([sp(-scale * t[:, 0]).sum() for t in xs])
    ly = np.array([sp(scale * t[:, 0]).sum() for t in ys])
    return np.array([len(t) for t in xs], float), lx, np.array([len(t) for t in ys], float), ly


def clf_p(pop, reps: int, seed: int) -> np.ndarray:
    nx, lx, ny, ly = pop
    rng = np.random.default_rng([seed, 0xC1F])
    held = np.arange(K) < 8  # the held-out buckets (jsd.heldout_fraction 0.25)
    out = []
    for _ in range(reps):
        c_KM = _bucket_counts(rng, len(nx)) * held[:, None]
        out.append(heldout_stats(c_KM @ lx, c_KM @ nx, c_KM @ ly, c_KM @ ny, 0.05)["p"])
    return np.asarray(out)


def test_classifier_bound_p_is_valid_on_a_planted_null_at_2e5_samples():
    """The least favourable null (a probe whose outputs barely leave 1/2) rejects at the nominal rate; a probe
    with larger outputs is conservative (its loss exceeds log 2 under the null). An SE that ignores one side's
    loss (half the influence) over-rejects here."""
    _rate_checks(clf_p(clf_population(1, 1e-5, 0.0), 1000, seed=2))
    p = clf_p(clf_population(1, 0.5, 0.0), 300, seed=2)
    assert np.mean(p <= 0.05) <= 0.05 + 4 * np.sqrt(0.05 * 0.95 / 300)


def test_classifier_bound_p_has_power_on_a_planted_shift_at_2e5_samples():
    """x tokens shifted by 0.1 in the coordinate the probe scores (logit 0.1 u): rejected in most replicates (a reversed tail
    has none)."""
    p = clf_p(clf_population(1, 0.1, 0.1), 200, seed=3)
    assert np.mean(p <= 0.05) >= 0.8, np.mean(p <= 0.05)


def test_heldout_stats_agree_with_the_balanced_log_loss():
    rng = np.random.default_rng(0)
    lx, ly, nx, ny = rng.random(K) * 10, rng.random(K) * 10, rng.integers(5, 9, K), rng.integers(5, 9, K)
    got = heldout_stats(lx, nx, ly, ny, 0.05)
    loss, infl = balanced_log_loss(lx, nx, ly, ny)
    assert got["bound"] == np.log(2) - loss
    assert got["se"] == stats.cluster_se(infl, np.ones(K, bool))


# --- exact and paper MMD: the cross-fit test of the exact kernel on the subsample ----------------------------

def _subsample(rng, shift: float, n_samples: int = 64) -> Subsample:
    """Image and text keys of ``n_samples`` samples (per-sample effect, 1-6 tokens a side), in random order; under
    the null each sample's two token sets are assigned to the sides at random (equal token distributions)."""
    ids = np.arange(n_samples) * 7919 + 13
    keys, sids = {"image": [], "text": []}, {"image": [], "text": []}
    for s in ids:
        e = 0.7 * rng.standard_normal(DIM)
        sets = [e + rng.standard_normal((rng.integers(1, 7), DIM)) for _ in range(2)]
        if rng.random() < 0.5:
            sets = sets[::-1]
        sets[0][:, 0] += shift
        for m, t in zip(("image", "text"), sets):
            keys[m].append(t)
            sids[m].append(np.full(len(t), s))
    out = {}
    for m in keys:
        x, sid = np.vstack(keys[m]), np.concatenate(sids[m])
        order = rng.permutation(len(x))
        out[m] = (x[order][:, None, :], sid[order])
    buckets = stats_buckets()
    return Subsample({m: v[0] for m, v in out.items()}, {m: v[1] for m, v in out.items()},
                     {m: buckets.of(v[1]) for m, v in out.items()})


def stats_buckets():
    from kscale.analysis.source import Buckets

    return Buckets(K, 0)


CFG = AnalyzeConfig(stores=["unused"], mmd=MMDConfig(kernels=["rbf"], normalisations=["none"], bandwidth_multiples=[1.0]),
                    exact_subsample=10_000, significance=SignificanceConfig(n_buckets=K))


def exact_p(shift: float, comp_name: str, reps: int, seed: int, paper_reps: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(exact row p, paper row p) of ``reps`` subsamples through ``rows.exact_rows`` / ``rows.paper_rows``."""
    rng = np.random.default_rng([seed, 0xE4A])
    comp = COMPS[comp_name]
    ctx = R.Context("s", 0, 0, 0.05, {comp_name: 1}, "block", "median", 0)
    plan = SimpleNamespace(bandwidth={"none": 2.0})
    paper = SimpleNamespace(bandwidth_rule="median", multiples=[0.5, 1.0, 2.0], estimator="unbiased")
    pe, pp = [], []
    for i in range(reps):
        sub = _subsample(rng, shift)
        row = R.exact_rows(ctx, sub, comp, [0], CFG, plan, {})[0]
        assert row["p_method"] == "cross_kernel_t"
        pe.append(row["p"])
        if i < paper_reps:
            pp.append(R.paper_rows(ctx, sub, comp, [0], 10_000, paper)[0]["p"])
    return np.asarray(pe), np.asarray(pp)


def test_exact_and_paper_p_reject_at_the_nominal_rate_on_a_planted_null():
    """300 subsamples of 64 samples (~220 tokens a side, dependent within a sample; 150 for the paper rows):
    exact and paper rows of the cross comparison reject at the nominal rate. A witness that also uses the
    fold-1 points (pairs of one sample and i = j enter) rejects far more often."""
    pe, pp = exact_p(0.0, "cross", 300, seed=1, paper_reps=150)
    for p in (pe, pp):
        assert abs(np.mean(p <= 0.05) - 0.05) <= 4 * np.sqrt(0.05 * 0.95 / len(p)), np.mean(p <= 0.05)
        assert sps.kstest(p, "uniform").pvalue > 1e-3


def test_exact_p_of_intra_rows_is_calibrated_and_has_power_on_a_shift():
    pe, _ = exact_p(0.0, "intra_text", 120, seed=4)
    assert abs(np.mean(pe <= 0.05) - 0.05) <= 4 * np.sqrt(0.05 * 0.95 / len(pe)), np.mean(pe <= 0.05)
    pe, pp = exact_p(0.8, "cross", 40, seed=5, paper_reps=40)
    assert np.mean(pe <= 0.05) >= 0.8 and np.mean(pp <= 0.05) >= 0.8, (np.mean(pe <= 0.05), np.mean(pp <= 0.05))


def test_bucket_pair_p_equals_the_witness_test_computed_point_by_point():
    """The bucket-pair form of the exact test equals a direct computation: witness f(z) = mean over fold-0 x of
    k(z, x) - mean over fold-0 y of k(z, y) at every fold-1 point, summed per bucket, studentised."""
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((90, 2)), rng.standard_normal((70, 2)) + 0.3
    bx, by = rng.integers(0, 8, 90), rng.integers(0, 8, 70)
    from kscale.analysis.mmd import exact_mmd2

    res = exact_mmd2(x, y, [("rbf", 1.3)], bucket_x=bx, bucket_y=by, n_buckets=8, block=16)
    fold = np.arange(8) % 2
    got = stats.bucket_pair_p(res.pairs.xx_kKK[0], res.pairs.xy_kKK[0], res.pairs.yy_kKK[0], res.pairs.nx_K,
                              res.pairs.ny_K, fold)
    k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * 1.3**2))  # noqa: E731
    x0, y0 = x[fold[bx] == 0], y[fold[by] == 0]
    f = lambda z: k(z, x0).mean(1) - k(z, y0).mean(1)  # noqa: E731
    t1 = fold == 1
    fx_K = np.bincount(bx, f(x) * (fold[bx] == 1), 8)
    fy_K = np.bincount(by, f(y) * (fold[by] == 1), 8)
    want = stats.witness_t_p(fx_K, np.bincount(bx, minlength=8) * t1, fy_K, np.bincount(by, minlength=8) * t1,
                             t1 & ((np.bincount(bx, minlength=8) + np.bincount(by, minlength=8)) > 0))
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --- end to end: every row of a run names its test -------------------------------------------------------------

def test_every_row_of_a_run_has_a_p_and_names_its_test_and_ratio_rows_take_the_cross_rows_p(tmp_path):
    """A run with every estimator (RF, linear, exact, paper, histogram and classifier JSD, ratios): every row has a
    ``p_method``; every p is finite except the LDA histogram rows, which say why; each ratio row's p is the cross
    row's of the same kernel, normalisation and multiple (the normalised gap's: the primary cross row's, here a
    permutation p); the report lists the test of every row family."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from analysis_fakes import make_store

    from kscale.analysis.run import analyze
    from kscale.spec.analyze import EmbedConfig, JSDConfig, PaperConfig

    ks = make_store(n_samples=48, layers=(0,), n_heads=2, head_dim=4, shift=0.8)
    cfg = AnalyzeConfig(stores=["unused"], exact_subsample=120,
                        mmd=MMDConfig(n_features=32, median_subsample=100, kernels=["rbf", "linear"],
                                      normalisations=["none", "l2"], bandwidth_multiples=[0.5, 1.0]),
                        jsd=JSDConfig(epochs=1, classifiers=["logistic"]), paper_mode=PaperConfig(enabled=True),
                        significance=SignificanceConfig(n_buckets=16, permutations=49), embed=EmbedConfig(methods=[]))
    df = analyze(cfg, tmp_path / "run", stores=[ks])
    assert df.p_method.notna().all(), df[df.p_method.isna()][["estimator", "comparison"]]
    lda = df.estimator == "jsd_hist_lda"
    assert lda.any() and (df[lda].p_method == "none_fitted_direction").all() and df[lda].p.isna().all()
    assert np.isfinite(df[~lda].p.astype(float)).all(), df[~lda & df.p.isna()][["estimator", "comparison"]]
    assert set(df.p_method) >= {"cross_mmd_t", "sequence_permutation_49", "cross_kernel_t", "cross_hist_t",
                                "heldout_t", "cross_row_cross_mmd_t", "cross_row_sequence_permutation_49"}
    key = ["layer", "head", "kernel", "normalisation", "multiple"]
    cross = df[(df.estimator == "mmd2_rf") & (df.comparison == "cross")].set_index(key)
    for est in ("ratio_mmd2_rf", "gap_normalised"):
        rat = df[df.estimator == est].set_index(key)
        assert len(rat)
        np.testing.assert_array_equal(rat.p.astype(float), cross.loc[rat.index].p.astype(float))
        assert (rat.p_method == "cross_row_" + cross.loc[rat.index].p_method).all()
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Tests behind the p-values" in html and "<td>cross row's sequence permutation (49)</td>" in html
    for name in ("cross-fit t (exact kernel)", "cross-fit t (bin frequencies)", "held-out t",
                 "none (direction fitted on these tokens)"):
        assert f"<td>{name}</td>" in html, name
