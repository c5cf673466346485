"""Sampling errors, intervals and p-values for the estimators of ``mmd.py`` and ``jsd.py``.

Tokens of one sample are dependent, so every error here is clustered by sample: samples are hashed
into K buckets (``source.Buckets``) and buckets are the clusters.

- MMD rows: the delete-one-bucket jackknife of the row's own estimator (``mmd.jackknife_se``; every
  sum is per bucket, so the K replicates cost one pass over the sums). :func:`jackknife_cov` gives the
  covariance of two estimates from their replicates (ratios, differences).
- :func:`cross_mmd_p`: witness from one half of the buckets, its mean difference studentised on the
  other half (Kübler et al. 2022 / Shekhar et al. 2022 "cross-MMD"): a one-sided t-test, no
  permutations, valid at any size because the witness is independent of the test half.
- :func:`permutation_p`: sequence-level permutations of per-(sample, modality) feature sums, with the
  statistic in the row's estimator form (pairs within a sequence left out for the sample-block form).
- :func:`fieller_interval` for ratios (cross / intra) with covariance from joint replicates.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from kscale.analysis.mmd import Side


def cluster_se(influence_K: np.ndarray, nonempty_K: np.ndarray) -> float:
    g = int(nonempty_K.sum())
    if g < 2:
        return float("nan")
    return float(np.sqrt(g / (g - 1) * (influence_K[nonempty_K] ** 2).sum()))


def jackknife_cov(a_K: np.ndarray, b_K: np.ndarray, nonempty_K: np.ndarray) -> float:
    """Jackknife covariance of two estimates from their delete-one-bucket replicates."""
    a, b = a_K[nonempty_K], b_K[nonempty_K]
    g = len(a)
    if g < 2:
        return float("nan")
    return float((g - 1) / g * ((a - a.mean()) * (b - b.mean())).sum())


def t_interval(value: float, se: float, n_clusters: int, alpha: float) -> tuple[float, float]:
    if not np.isfinite(se) or n_clusters < 2:
        return float("nan"), float("nan")
    q = sps.t.ppf(1 - alpha / 2, n_clusters - 1)
    return value - q * se, value + q * se


def cross_mmd_p(x: Side, y: Side, fold_K: np.ndarray) -> tuple[float, float]:
    """(one-sided p, z) of the cross-MMD test: witness on fold 0, studentised mean gap on fold 1."""
    x0, y0 = x.restrict(fold_K == 0), y.restrict(fold_K == 0)
    x1, y1 = x.restrict(fold_K == 1), y.restrict(fold_K == 1)
    if min(x0.n, y0.n, x1.n, y1.n) < 2:
        return float("nan"), float("nan")
    delta_F = x0.total() / x0.n - y0.total() / y0.n
    fx_K, fy_K = x1.feat_KF @ delta_F, y1.feat_KF @ delta_F
    return witness_t_p(fx_K, x1.n_K, fy_K, y1.n_K, (fold_K == 1) & ((x1.n_K + y1.n_K) > 0))


def witness_t_p(fx_K: np.ndarray, nx_K: np.ndarray, fy_K: np.ndarray, ny_K: np.ndarray, test_K: np.ndarray,
                ) -> tuple[float, float]:
    """(one-sided p, t) of a witness fitted elsewhere: ``fx_K`` / ``fy_K`` are per-bucket sums of the witness
    over the x / y points of the test buckets (``test_K``; zero elsewhere), ``nx_K`` / ``ny_K`` their counts.
    The mean gap mean_x f - mean_y f is studentised by its bucket-clustered SE (ratio-estimator influence),
    t with G - 1 degrees of freedom over the G test buckets. Shared by every cross-fit test of the table:
    random features (:func:`cross_mmd_p`), bin indicators (histogram JSD) and exact kernels
    (:func:`bucket_pair_p`)."""
    n, m = float(nx_K.sum()), float(ny_K.sum())
    if min(n, m) < 2:
        return float("nan"), float("nan")
    mx, my = fx_K.sum() / n, fy_K.sum() / m
    r_K = (fx_K - nx_K * mx) / n - (fy_K - ny_K * my) / m
    se = cluster_se(r_K, test_K)
    if not se > 0:
        return float("nan"), float("nan")
    z = (mx - my) / se
    return float(sps.t.sf(z, int(test_K.sum()) - 1)), float(z)


def bucket_pair_p(xx_KK: np.ndarray, xy_KK: np.ndarray, yy_KK: np.ndarray, nx_K: np.ndarray, ny_K: np.ndarray,
                  fold_K: np.ndarray) -> tuple[float, float]:
    """The cross-fit test of an exact kernel from its bucket-pair sums: ``ab_KK[k, l]`` = sum of k(a_i, b_j)
    over a-points i of bucket k and b-points j of bucket l. The witness is the kernel mean embedding gap of
    the fold-0 points, f(z) = mean_{x in fold 0} k(z, x) - mean_{y in fold 0} k(z, y), evaluated at the
    fold-1 points; only pairs across the folds are read, so no pair of one sample (or i = j) ever enters."""
    f0, f1 = fold_K == 0, fold_K == 1
    n0, m0 = float(nx_K[f0].sum()), float(ny_K[f0].sum())
    if min(n0, m0) < 2:
        return float("nan"), float("nan")
    fx_K = (xx_KK[:, f0].sum(1) / n0 - xy_KK[:, f0].sum(1) / m0) * f1
    fy_K = (xy_KK[f0, :].sum(0) / n0 - yy_KK[:, f0].sum(1) / m0) * f1
    return witness_t_p(fx_K, nx_K * f1, fy_K, ny_K * f1, f1 & ((nx_K + ny_K) > 0))


def difference_t_p(a: float, b: float, var_a: float, var_b: float, cov: float, n_clusters: int,
                   ) -> tuple[float, float]:
    """(one-sided p, t) of H0: a <= b from jackknife (co)variances, t with G - 1 degrees of freedom: the test
    dual to Fieller's interval of a / b at 1 (the interval excludes 1 exactly when |t| exceeds its quantile)."""
    var = var_a + var_b - 2 * cov
    if n_clusters < 2 or not var > 0:
        return float("nan"), float("nan")
    z = (a - b) / math.sqrt(var)
    return float(sps.t.sf(z, n_clusters - 1)), float(z)


def heldout_bound_p(bound: float, se: float, n_clusters: int) -> tuple[float, float]:
    """(one-sided p, t) of H0: JSD = 0 from a classifier's held-out bound log 2 - L: under H0 every fixed
    classifier q has balanced log-loss >= log 2 (pointwise -log q / 2 - log(1 - q) / 2 >= log 2), so the
    bound's mean is <= 0 and the t-test of bound > 0 over the held-out buckets is valid (conservative unless
    q = 1/2 everywhere)."""
    if n_clusters < 2 or not se > 0:
        return float("nan"), float("nan")
    z = bound / se
    return float(sps.t.sf(z, n_clusters - 1)), float(z)


def permutation_p(feat_UF: np.ndarray, count_U: np.ndarray, sq_U: np.ndarray, is_x_U: np.ndarray,
                  n_perm: int, seed: int, chunk: int = 250, pairs_U: np.ndarray | None = None,
                  ) -> tuple[float, float]:
    """(p, observed MMD^2) of a permutation test that reassigns whole sequences (units) to sides.

    ``sq_U`` and ``pairs_U`` are each unit's left-out kernel sum and pair count: sum_i |phi(x_i)|^2 and
    n_u for the token-level statistic (the default ``pairs_U = count_U``), |S_u|^2 and n_u^2 for the
    sample-block one. The statistic is recomputed from permuted unit sums, ``S_x* = L @ feat``, one
    matrix product per chunk of permutations; ``p = (1 + #{T* >= T}) / (1 + n_perm)``.
    """
    rng = np.random.default_rng([seed, 0xBEE])
    pairs_U = count_U if pairs_U is None else pairs_U
    total_F, n_tot, sq_tot, pairs_tot = feat_UF.sum(0), count_U.sum(), sq_U.sum(), pairs_U.sum()
    n_x_units = int(is_x_U.sum())

    def stat(lab_PU: np.ndarray) -> np.ndarray:
        sx_PF = lab_PU @ feat_UF
        n, qx, px = lab_PU @ count_U, lab_PU @ sq_U, lab_PU @ pairs_U
        sy_PF = total_F - sx_PF
        m, qy, py = n_tot - n, sq_tot - qx, pairs_tot - px
        sxx, syy, sxy = (sx_PF**2).sum(1), (sy_PF**2).sum(1), (sx_PF * sy_PF).sum(1)
        return (sxx - qx) / (n * n - px) + (syy - qy) / (m * m - py) - 2 * sxy / (n * m)

    observed = float(stat(is_x_U[None].astype(np.float64))[0])
    exceed = 0
    for lo in range(0, n_perm, chunk):
        p = min(chunk, n_perm - lo)
        order_PU = np.argsort(rng.random((p, len(count_U))), axis=1)
        lab_PU = np.zeros((p, len(count_U)))
        np.put_along_axis(lab_PU, order_PU[:, :n_x_units], 1.0, axis=1)
        exceed += int((stat(lab_PU) >= observed).sum())
    return (1 + exceed) / (1 + n_perm), observed


def fieller_interval(a: float, b: float, var_a: float, var_b: float, cov: float,
                     alpha: float) -> tuple[float, float]:
    """Fieller's interval for a / b; unbounded (-inf, inf) when b is not significantly non-zero."""
    z2 = sps.norm.ppf(1 - alpha / 2) ** 2
    qa, qb, qc = b * b - z2 * var_b, -2 * (a * b - z2 * cov), a * a - z2 * var_a
    disc = qb * qb - 4 * qa * qc
    if not (np.isfinite(disc) and qa > 0 and disc >= 0):
        return -math.inf, math.inf
    root = math.sqrt(disc)
    return (-qb - root) / (2 * qa), (-qb + root) / (2 * qa)


def jackknife(full: float, leave_one_out_G: np.ndarray) -> tuple[float, float]:
    """(bias-corrected value, SE) of the delete-one-cluster jackknife."""
    g = len(leave_one_out_G)
    if g < 2:
        return full, float("nan")
    mean = leave_one_out_G.mean()
    se = math.sqrt((g - 1) / g * ((leave_one_out_G - mean) ** 2).sum())
    return full, se


def clustered_witness_se(wx_n: np.ndarray, sid_x: np.ndarray, wy_m: np.ndarray,
                         sid_y: np.ndarray) -> tuple[float, int]:
    """(SE, clusters) of an exact MMD^2 from witness values at its points, clustered by sample id."""
    ids, inv = np.unique(np.concatenate([sid_x, sid_y]), return_inverse=True)
    n, m = len(wx_n), len(wy_m)
    contrib = np.concatenate([2 * (wx_n - wx_n.mean()) / n, -2 * (wy_m - wy_m.mean()) / m])
    r_G = np.bincount(inv, weights=contrib, minlength=len(ids))
    return cluster_se(r_G, np.ones(len(ids), bool)), len(ids)
