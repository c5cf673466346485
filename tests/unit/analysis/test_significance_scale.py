"""The p-value that rows carry above ``significance.max_permutation_units`` (the cross-MMD t-test,
``stats.cross_mmd_p``) at the scale kscale is built for: calibrated on a planted null and powerful on a
planted shift with 2·10^5 samples per replicate, thousands of replicates in seconds.

Replicates never touch a store: the test only reads per-bucket token counts and per-bucket feature sums,
so each replicate draws those directly. A finite population of samples (atoms) is built once, each with an
image-like and a text-like token set that share a per-sample effect (tokens of a sample are dependent,
counts differ by side and are heavy-tailed); a replicate draws how many copies of each atom fall in each
bucket, Poisson(N / (K M)) per (bucket, atom) — N = 2·10^5 samples on average hashed into K buckets — and
the bucket sums are ``counts_KM @ atom sums``. The null population is swap-symmetric: for every atom
(A, B) it also holds (B, A), so the token distributions of the two sides are exactly equal while tokens
within a sample stay dependent. The shift adds a constant to one coordinate of every x-side token.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from kscale.analysis import stats
from kscale.analysis.mmd import Side
from kscale.analysis.plan import comparisons

K, D_FREQ, DIM, N_SAMPLES, ATOMS = 32, 32, 4, 200_000, 150


def _features(tokens_nd: np.ndarray, w_Dd: np.ndarray) -> np.ndarray:
    """Sum over tokens of the random-feature map [cos w.x, sin w.x] (2D,)."""
    p = tokens_nd @ w_Dd.T
    return np.concatenate([np.cos(p), np.sin(p)], 1).sum(0)


def population(seed: int, shift: float) -> tuple[np.ndarray, ...]:
    """Atoms: (x counts, y counts, x feature sums, y feature sums); swap-symmetric before the shift."""
    rng = np.random.default_rng([seed, 0xA70])
    w_Dd = rng.standard_normal((D_FREQ, DIM)) / 1.5
    effect = 0.7 * rng.standard_normal((ATOMS, DIM))
    n_a, n_b = rng.geometric(1 / 30, ATOMS), rng.geometric(1 / 8, ATOMS)  # long and short sides
    a = [e + rng.standard_normal((n, DIM)) for e, n in zip(effect, n_a)]
    b = [e + rng.standard_normal((n, DIM)) for e, n in zip(effect, n_b)]
    xs, ys = a + b, b + a  # every sample also with its sides swapped: equal token distributions
    step = np.zeros(DIM)
    step[0] = shift
    nx = np.array([len(t) for t in xs], float)
    ny = np.array([len(t) for t in ys], float)
    fx = np.array([_features(t + step, w_Dd) for t in xs])
    fy = np.array([_features(t, w_Dd) for t in ys])
    return nx, ny, fx, fy


def _side(n_K: np.ndarray, feat_KF: np.ndarray) -> Side:
    """A Side from per-bucket counts and feature sums (the pairs-left-out sums are not read by the test)."""
    zero_KG = np.zeros((len(n_K), feat_KF.shape[1] // 2))
    return Side(n_K, feat_KF.reshape(len(n_K), -1, 2), zero_KG, zero_KG, np.zeros(len(n_K)))


def bucket_sums(rng: np.random.Generator, pop: tuple[np.ndarray, ...]) -> tuple[Side, Side]:
    nx, ny, fx, fy = pop
    c_KM = rng.poisson(N_SAMPLES / (K * len(nx)), (K, len(nx))).astype(float)
    return _side(c_KM @ nx, c_KM @ fx), _side(c_KM @ ny, c_KM @ fy)


def replicate_p(pop, comp_name: str, reps: int, seed: int) -> np.ndarray:
    """p of ``reps`` replicates for one comparison, its sides and folds exactly as ``rows.py`` makes them."""
    comp = {c.name: c for c in comparisons(["cross", "intra_text"], "image")}[comp_name]
    rng = np.random.default_rng([seed, 0x5CA])
    bucket_K = np.arange(K)
    keep_x, keep_y, fold_K = comp.mask("x", bucket_K), comp.mask("y", bucket_K), comp.fold(bucket_K)
    out = []
    for _ in range(reps):
        x, y = bucket_sums(rng, pop)
        if comp.mod_x == comp.mod_y:  # intra: one modality (the y side here) split by bucket parity
            x = y
        out.append(stats.cross_mmd_p(x.restrict(keep_x), y.restrict(keep_y), fold_K)[0])
    return np.asarray(out)


@pytest.mark.parametrize("comp_name", ["cross", "intra_text"])
def test_cross_mmd_rejects_at_the_nominal_rate_on_a_planted_null_at_2e5_samples(comp_name):
    """1,500 replicates of 2·10^5 samples: the rate at alpha = 0.05 within 4 binomial SDs of 0.05, at 0.01
    below 0.01 + 4 SDs, and the p-values uniform (KS). A witness estimated on the test fold itself (not on
    the other fold) rejects 77-80% of these nulls."""
    reps = 1500
    p = replicate_p(population(1, 0.0), comp_name, reps, seed=2)
    sd = np.sqrt(0.05 * 0.95 / reps)
    assert abs(np.mean(p <= 0.05) - 0.05) <= 4 * sd, np.mean(p <= 0.05)
    assert np.mean(p <= 0.01) <= 0.01 + 4 * np.sqrt(0.01 * 0.99 / reps), np.mean(p <= 0.01)
    assert sps.kstest(p, "uniform").pvalue > 1e-3


def test_cross_mmd_has_power_on_a_planted_shift_at_2e5_samples():
    """A shift of 0.02 (1.6% of a token's SD) in one coordinate of the image-side tokens: rejected in most
    of 300 replicates at alpha = 0.05 (0.93 measured; 0.41 at 0.01, 1.0 at 0.03), its p-values far below
    the null's. A test that ignored the fold-1 gap, or a two-sided/reversed tail, loses this."""
    p = replicate_p(population(1, 0.02), "cross", 300, seed=3)
    assert np.mean(p <= 0.05) >= 0.8, np.mean(p <= 0.05)
    null = replicate_p(population(1, 0.0), "cross", 300, seed=3)
    assert np.median(p) < np.median(null) / 10


# --- rows and report: above the unit limit the p-value stays, named --------------------------------------

def _run(tmp_path, name: str, **significance) -> "pd.DataFrame":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from analysis_fakes import make_store

    from kscale.analysis.run import analyze
    from kscale.spec.analyze import AnalyzeConfig, EmbedConfig, MMDConfig, SignificanceConfig

    ks = make_store(n_samples=24, layers=(0, 1), n_heads=1, head_dim=4, shift=0.8)
    cfg = AnalyzeConfig(stores=["unused"], estimators=["mmd_rf"], pooled=False,
                        mmd=MMDConfig(n_features=32, median_subsample=50, kernels=["rbf"], normalisations=["none"],
                                      bandwidth_multiples=[1.0]),
                        significance=SignificanceConfig(n_buckets=8, **significance), embed=EmbedConfig(methods=[]))
    return analyze(cfg, tmp_path / name, stores=[ks])


def test_above_max_permutation_units_rows_keep_a_cross_mmd_p_and_the_report_names_every_test(tmp_path):
    """24 samples: with the limit above them the primary rows are permuted; with ``max_permutation_units: 4``
    they keep their cross-MMD p (the one a run without permutations gives), ``p_method`` names it, the
    row's conventions say why, and the report shows every layer's p with its test, in the layer table and
    in the verdict."""
    import json

    permuted = _run(tmp_path, "permuted", permutations=49)
    limited = _run(tmp_path, "limited", permutations=49, max_permutation_units=4)
    plain = _run(tmp_path, "plain", permutations=0)
    prim = lambda df: df[(df.estimator == "mmd2_rf")].reset_index(drop=True)  # noqa: E731
    assert set(prim(permuted).p_method) == {"sequence_permutation_49"}
    rows = prim(limited)
    assert set(rows.p_method) == {"cross_mmd_t"} and rows.p.notna().all()
    np.testing.assert_array_equal(rows.p.to_numpy(), prim(plain).p.to_numpy())
    assert all("max_permutation_units" in json.loads(c)["p"] for c in rows.conventions)
    html = (tmp_path / "limited" / "report.html").read_text().split("Tests behind the p-values")[0]  # layer table
    assert "<th>p test</th>" in html and html.count("<td>cross-MMD t</td>") == 2
    assert "p-values: cross-MMD t, the cross-MMD t-test" in html and "(layers 0–1)" in html
    html = (tmp_path / "permuted" / "report.html").read_text().split("Tests behind the p-values")[0]
    assert html.count("<td>sequence permutation (49)</td>") == 2 and "p-values: sequence permutation (49)" in html


def _table(p_method, p=1e-4, layers=3) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for layer in range(layers):
        for comp, value, pv in (("cross", 0.3, p), ("intra_text", 0.001, 0.5), ("intra_image", 0.0, 0.5)):
            rows.append({"store": "/s/keys", "layer": layer, "head": -1, "comparison": comp, "estimator": "mmd2_rf",
                         "kernel": "rbf", "normalisation": "none", "multiple": 1.0, "value": value,
                         "ci_low": value - 0.01, "ci_high": value + 0.01, "p": pv, "p_method": p_method})
    return pd.DataFrame(rows)


def test_verdict_names_the_test_and_says_when_permutations_are_too_few_for_holm():
    """Three layers of permutation p-values at their floor 1/(N+1): with 19 permutations Holm lifts the
    smallest to 3/20 > 0.05, which the verdict says (and no layer is significant); with 999 it does not."""
    import re

    from kscale.analysis import verdict as V

    few = re.sub("<[^>]+>", "", " ".join(V.verdict(_table("sequence_permutation_19", p=1 / 20))))
    assert "significant in 0 of 3 layers" in few
    assert "p-values: sequence permutation (19)" in few and "Holm over 3 layers lifts to 0.15" in few
    enough = " ".join(V.verdict(_table("sequence_permutation_999", p=1 / 1000)))
    assert "sequence permutation (999)" in enough and "lifts to" not in enough
    assert V.p_test(None, float("nan")) == "none (interval alone)"
    assert V.p_test("cross_mmd_t", float("nan")) == "cross-MMD t: undefined here"
    no_column = " ".join(V.verdict(_table(None).drop(columns="p_method")))
    assert "p-values: unnamed test" in no_column


def test_verdict_asks_for_more_random_features_where_their_error_exceeds_the_sampling_error():
    """The rule of docs/analysis.md: D >= D_now * (approx_sd / se)^2 on the primary cross rows; a table
    whose approximation error is below the sampling error gets no such sentence."""
    import json

    from kscale.analysis import verdict as V

    df = _table("cross_mmd_t").assign(se=0.01, approx_sd=0.005, conventions=json.dumps({"D": 1024}))
    assert "n_features" not in " ".join(V.verdict(df))
    df.loc[(df.comparison == "cross") & (df.layer == 2), "approx_sd"] = 0.03
    text = " ".join(V.verdict(df))
    assert "In 1 of 3 layers (2)" in text and "mmd.n_features ≥ 9216" in text  # 1024 * 3^2
