"""MMD^2 estimators: from mergeable feature sums (streaming) and exact on a subsample (blocked).

Tokens of one sample are dependent, so pairs of tokens from one sample carry no information about the
difference of two distributions and bias a token-level U-statistic (which leaves out only i = j). The
**sample-block** U-statistic (default, ``mmd.estimator: block``) leaves out every pair within one sample,
on each side and across the two sides (image and text tokens of one sample)::

    MMD^2 = (|S_x|^2 - W_x) / (n^2 - sum_s n_s^2) + (|S_y|^2 - W_y) / (m^2 - sum_s m_s^2)
            - 2 (S_x.S_y - W_xy) / (n m - sum_s n_s m_s)

with S the feature sums of a side, W_x = sum_s |S_s|^2 over its samples and W_xy = sum_s S_s(x).S_s(y).
The **token-level** statistic (``mmd.estimator: token``) is the same with W_x = sum_i |phi(x_i)|^2 (= n for
random features), sum_s n_s^2 = n and nothing left out across sides. Every quantity is a sum over
sample buckets, so leaving one bucket out is cheap: the SE is the delete-one-bucket jackknife
(:func:`jackknife_se`), which stays honest at the null where a first-order (witness) SE vanishes.

Random features are grouped by frequency (cos and sin of one frequency: G = D groups of F = 2): the
value is the mean of per-frequency terms t_j, whose spread gives the approximation error
``sd(t_j) / sqrt(D)``. The linear kernel is one group of the d key dimensions.

The exact estimator (:func:`exact_parts`) accumulates kernel sums block by block in float64, with the
same exclusions and the same per-bucket bookkeeping (values and jackknife agree in form with the
streamed rows). :func:`exact_mmd2` is the plain token-level form with witness values (paper mode).

Shapes: K buckets, G groups, F features per group, D frequencies, n/m points, b block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("block", "token")


@dataclass(frozen=True)
class Side:
    """Per-bucket sums of one side: ``n_K`` points, grouped feature sums ``feat_KGF``, ``diag_KG`` =
    sum_i |phi_G(x_i)|^2 (the i = j pairs), ``within_KG`` = sum_s |S_sG|^2 (pairs within a sample, i = j
    included) and ``nsq_K`` = sum_s n_s^2."""

    n_K: np.ndarray
    feat_KGF: np.ndarray
    diag_KG: np.ndarray
    within_KG: np.ndarray
    nsq_K: np.ndarray

    @property
    def n(self) -> float:
        return float(self.n_K.sum())

    def total(self) -> np.ndarray:
        """Feature sums over buckets, flattened (G*F,)."""
        return self.feat_KGF.sum(axis=0).ravel()

    @property
    def feat_KF(self) -> np.ndarray:
        return self.feat_KGF.reshape(len(self.n_K), -1)

    def restrict(self, keep_K: np.ndarray) -> Side:
        k = keep_K.astype(float)
        return Side(self.n_K * k, self.feat_KGF * k[:, None, None], self.diag_KG * k[:, None],
                    self.within_KG * k[:, None], self.nsq_K * k)


@dataclass(frozen=True)
class CrossWithin:
    """sum_s S_s(x).S_s(y) per group (K, G) and sum_s n_s m_s (K,): pairs across sides within a sample."""

    within_KG: np.ndarray
    nn_K: np.ndarray

    def restrict(self, keep_K: np.ndarray) -> CrossWithin:
        k = keep_K.astype(float)
        return CrossWithin(self.within_KG * k[:, None], self.nn_K * k)


def rf_side(count_K: np.ndarray, rf_K2D: np.ndarray, self_KD: np.ndarray, nsq_K: np.ndarray) -> Side:
    """A side from raw cos/sin sums (K, 2, D): groups are frequencies, each token has |phi_j|^2 = 1."""
    D = rf_K2D.shape[2]
    return Side(count_K, rf_K2D.transpose(0, 2, 1), np.repeat(count_K[:, None], D, 1), self_KD, nsq_K)


def linear_side(count_K: np.ndarray, lin_Kd: np.ndarray, linsq_K: np.ndarray, self_K: np.ndarray,
                nsq_K: np.ndarray) -> Side:
    return Side(count_K, lin_Kd[:, None, :], linsq_K[:, None], self_K[:, None], nsq_K)


def _exclusions(x: Side, y: Side, xy: CrossWithin | None, estimator: str):
    """(left-out sums per group, pair counts) of the xx, yy and xy terms, per bucket (K, G) / (K,)."""
    if estimator == "token":
        zero_KG = np.zeros_like(x.diag_KG)
        return (x.diag_KG, x.n_K), (y.diag_KG, y.n_K), (zero_KG, np.zeros_like(x.n_K))
    if estimator != "block":
        raise ValueError(f"unknown estimator {estimator!r} (one of {ESTIMATORS})")
    xy = xy if xy is not None else CrossWithin(np.zeros_like(x.diag_KG), np.zeros_like(x.n_K))
    return (x.within_KG, x.nsq_K), (y.within_KG, y.nsq_K), (xy.within_KG, xy.nn_K)


def mmd2_terms(x: Side, y: Side, xy: CrossWithin | None = None, estimator: str = "block") -> np.ndarray:
    """Per-group U-statistic terms (G,); their mean is the MMD^2 estimate (see module docstring)."""
    (ex, px), (ey, py), (exy, pxy) = _exclusions(x, y, xy, estimator)
    sx_GF, sy_GF = x.feat_KGF.sum(0), y.feat_KGF.sum(0)
    n, m = x.n, y.n
    xx = ((sx_GF**2).sum(1) - ex.sum(0)) / (n * n - px.sum())
    yy = ((sy_GF**2).sum(1) - ey.sum(0)) / (m * m - py.sum())
    cross = ((sx_GF * sy_GF).sum(1) - exy.sum(0)) / (n * m - pxy.sum())
    return xx + yy - 2 * cross


def _loo_dot(a_KF: np.ndarray, b_KF: np.ndarray) -> np.ndarray:
    """(A - a_k).(B - b_k) for every bucket k left out, with A, B the sums over buckets (K,)."""
    A, B = a_KF.sum(0), b_KF.sum(0)
    return A @ B - a_KF @ B - b_KF @ A + np.einsum("kf,kf->k", a_KF, b_KF)


def mmd2_leave_one_out(x: Side, y: Side, xy: CrossWithin | None = None, estimator: str = "block",
                       ) -> np.ndarray:
    """The estimate with each bucket left out in turn (K,): the replicates of the jackknife."""
    (ex, px), (ey, py), (exy, pxy) = _exclusions(x, y, xy, estimator)
    G = x.feat_KGF.shape[1]
    fx, fy = x.feat_KF, y.feat_KF
    n_K, m_K = x.n - x.n_K, y.n - y.n_K

    def loo(total_K, excl_KG, pairs_K, count_K):
        return (total_K - (excl_KG.sum() - excl_KG.sum(1))) / G / (count_K - (pairs_K.sum() - pairs_K))

    xx = loo(_loo_dot(fx, fx), ex, px, n_K**2)
    yy = loo(_loo_dot(fy, fy), ey, py, m_K**2)
    cross = loo(_loo_dot(fx, fy), exy, pxy, n_K * m_K)
    with np.errstate(divide="ignore", invalid="ignore"):
        return xx + yy - 2 * cross


def jackknife_se(loo_K: np.ndarray, nonempty_K: np.ndarray) -> float:
    """Delete-one-bucket jackknife SE over the non-empty buckets: sqrt((g-1)/g sum (t_b - mean)^2)."""
    t = loo_K[nonempty_K]
    g = len(t)
    if g < 2 or not np.all(np.isfinite(t)):
        return float("nan")
    return float(np.sqrt((g - 1) / g * ((t - t.mean()) ** 2).sum()))


def mmd2_from_sums(x: Side, y: Side, xy: CrossWithin | None = None, estimator: str = "block") -> float:
    """The MMD^2 estimate (mean of the per-group terms)."""
    return float(mmd2_terms(x, y, xy, estimator).mean())


def rf_mmd2(x: Side, y: Side, xy: CrossWithin | None = None, estimator: str = "block",
            ) -> tuple[float, float]:
    """(MMD^2, approximation SD) of the random-feature estimate."""
    t_D = mmd2_terms(x, y, xy, estimator)
    return float(t_D.mean()), float(t_D.std(ddof=1) / np.sqrt(len(t_D)))


# --- exact, on a subsample -------------------------------------------------------------------------

def kernel_block(sqdist_bb: np.ndarray, kernel: str, bandwidth: float, dist_bb: np.ndarray | None = None,
                 ) -> np.ndarray:
    """Kernel values from squared distances: rbf exp(-r^2/2s^2), laplacian exp(-r/s) (``dist_bb``: the
    distances sqrt(sqdist), when the caller already has them)."""
    if kernel == "rbf":
        out = np.divide(sqdist_bb, -(2.0 * bandwidth**2))
    elif kernel == "laplacian":  # r / -s: the bits of -r / s (IEEE division is sign-symmetric), one pass fewer
        out = np.divide(np.sqrt(sqdist_bb) if dist_bb is None else dist_bb, -bandwidth)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return np.exp(out, out=out)


def _sqdist(a_bd: np.ndarray, b_bd: np.ndarray) -> np.ndarray:
    """max(|a|^2 + |b|^2 - 2 a.b, 0), computed in place (the same operations, one temporary)."""
    sq = np.add.outer((a_bd**2).sum(1), (b_bd**2).sum(1))
    sq -= 2.0 * a_bd @ b_bd.T
    return np.maximum(sq, 0.0, out=sq)


def _bucket_pair_index(ba: np.ndarray, bb: np.ndarray, K: int) -> np.ndarray:
    """Flat (bucket of i, bucket of j) index of every pair of a block, for :func:`_add_bucket_pairs`."""
    return (ba[:, None] * K + bb[None, :]).ravel()


def _add_bucket_pairs(out_KK: np.ndarray, kb: np.ndarray, index: np.ndarray) -> None:
    """``out_KK[k, l] += sum of kb over pairs with i in bucket k and j in bucket l`` (one bincount). An index
    of K * K (:func:`_pair_sums`' left-out pairs) is a spare bin, dropped: bincount adds in element order,
    so every kept bin gets the additions it got when those pairs were zeroed and counted (x + 0.0 is x)."""
    K = len(out_KK)
    out_KK += np.bincount(index, kb.ravel(), K * K + 1)[:K * K].reshape(K, K)


def _row_sums(a_nd: np.ndarray, b_md: np.ndarray, kernels: list[tuple[str, float]], same: bool,
              block: int, buckets: tuple[np.ndarray, np.ndarray, int] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Row and column sums (len(kernels), n) / (len(kernels), m) of k(a_i, b_j), float64 blocks, and with
    ``buckets`` = (bucket of each a, of each b, K) the bucket-pair sums (len(kernels), K, K) as well.

    With ``same`` (a is b) the diagonal is left out: k(x, x) enters the estimators only through n.
    """
    rows_kn = np.zeros((len(kernels), len(a_nd)))
    cols_km = np.zeros((len(kernels), len(b_md)))
    pairs_kKK = None if buckets is None else np.zeros((len(kernels), buckets[2], buckets[2]))
    for i in range(0, len(a_nd), block):
        for j in range(0, len(b_md), block):
            sq = _sqdist(a_nd[i:i + block], b_md[j:j + block])
            if same and i == j:
                np.fill_diagonal(sq, np.inf)
            dist = np.sqrt(sq) if any(k == "laplacian" for k, _ in kernels) else None
            index = None if buckets is None else _bucket_pair_index(buckets[0][i:i + block],
                                                                    buckets[1][j:j + block], buckets[2])
            for k, (kernel, bw) in enumerate(kernels):
                kb = kernel_block(sq, kernel, bw, dist)
                rows_kn[k, i:i + block] += kb.sum(1)
                cols_km[k, j:j + block] += kb.sum(0)
                if index is not None:
                    _add_bucket_pairs(pairs_kKK[k], kb, index)
    return rows_kn, cols_km, pairs_kKK


@dataclass(frozen=True)
class ExactResult:
    """Exact MMD^2 per kernel, and witness values at every point (for clustered SEs)."""

    value_k: np.ndarray
    witness_x_kn: np.ndarray  # f(x_i) = mean_j' k(x_i, x_j') - mean_j k(x_i, y_j)
    witness_y_km: np.ndarray  # f(y_i) likewise, same sign convention
    n: int
    m: int
    pairs: BucketPairs | None = None  # with buckets given: for the cross-fit test (stats.bucket_pair_p)


@dataclass(frozen=True)
class BucketPairs:
    """Kernel sums by (bucket of i, bucket of j) of the xx, xy and yy pairs (k, K, K), and points per bucket:
    all a cross-fit test needs (:func:`kscale.analysis.stats.bucket_pair_p`)."""

    xx_kKK: np.ndarray
    xy_kKK: np.ndarray
    yy_kKK: np.ndarray
    nx_K: np.ndarray
    ny_K: np.ndarray

    def summed(self) -> BucketPairs:
        """The sums of a kernel that is the sum of the kernels (the paper's sum of RBFs), as one kernel."""
        return BucketPairs(self.xx_kKK.sum(0, keepdims=True), self.xy_kKK.sum(0, keepdims=True),
                           self.yy_kKK.sum(0, keepdims=True), self.nx_K, self.ny_K)


def exact_mmd2(x_nd: np.ndarray, y_md: np.ndarray, kernels: list[tuple[str, float]], *,
               biased: bool = False, block: int = 1024, bucket_x: np.ndarray | None = None,
               bucket_y: np.ndarray | None = None, n_buckets: int = 0) -> ExactResult:
    """Exact MMD^2 for several (kernel, bandwidth) pairs sharing one pass of distance blocks; with the points'
    sample buckets also their bucket-pair sums (``ExactResult.pairs``).

    Kernels are rbf or laplacian (k(x, x) = 1); the linear kernel is exact from sums already.
    """
    x_nd, y_md = np.asarray(x_nd, np.float64), np.asarray(y_md, np.float64)
    n, m = len(x_nd), len(y_md)
    bx = by = None
    if bucket_x is not None:
        bx, by = (bucket_x, bucket_x, n_buckets), (bucket_y, bucket_y, n_buckets)
    kxx_kn, _, pxx = _row_sums(x_nd, x_nd, kernels, True, block, bx)
    kyy_km, _, pyy = _row_sums(y_md, y_md, kernels, True, block, by)
    kxy_kn, kyx_km, pxy = _row_sums(x_nd, y_md, kernels, False, block,
                                    None if bx is None else (bucket_x, bucket_y, n_buckets))
    if biased:
        value = (kxx_kn.sum(1) + n) / n**2 + (kyy_km.sum(1) + m) / m**2 - 2 * kxy_kn.sum(1) / (n * m)
    else:
        value = kxx_kn.sum(1) / (n * (n - 1)) + kyy_km.sum(1) / (m * (m - 1)) - 2 * kxy_kn.sum(1) / (n * m)
    wx = kxx_kn / (n - 1) - kxy_kn / m
    wy = kyx_km / n - kyy_km / (m - 1)
    pairs = None if bx is None else BucketPairs(pxx, pxy, pyy, np.bincount(bucket_x, minlength=n_buckets),
                                                np.bincount(bucket_y, minlength=n_buckets))
    return ExactResult(value, wx, wy, n, m, pairs)


@dataclass
class _PairSums:
    """Kernel sums over the kept pairs (i in a, j in b): total, by the bucket of i (row), of j (col) and
    of pairs with both in one bucket (same); kernel-free pair counts likewise (kernel axis k)."""

    total_k: np.ndarray
    row_kK: np.ndarray
    col_kK: np.ndarray
    same_kK: np.ndarray
    count: np.ndarray  # (4, K): row, col, same per bucket; total = row.sum()
    pair_kKK: np.ndarray  # kernel sums of the kept pairs by (bucket of i, bucket of j)

    def loo(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel sums (k, K), pair counts (K,)) with each bucket left out."""
        s = self.total_k[:, None] - self.row_kK - self.col_kK + self.same_kK
        c = self.count[0].sum() - self.count[0] - self.count[1] + self.count[2]
        return s, c


def _pair_sums(a_nd, b_md, ids_a, ids_b, bk_a, bk_b, kernels, K: int, exclude: str, block: int) -> _PairSums:
    """Blocked float64 kernel sums over pairs, leaving out ``exclude``: "diag" (i = j, a is b),
    "sample" (same sample id) or "none"."""
    k = len(kernels)
    out = _PairSums(np.zeros(k), np.zeros((k, K)), np.zeros((k, K)), np.zeros((k, K)), np.zeros((3, K)),
                    np.zeros((k, K, K)))
    for i in range(0, len(a_nd), block):
        for j in range(0, len(b_md), block):
            sq = _sqdist(a_nd[i:i + block], b_md[j:j + block])
            keep = np.ones(sq.shape, bool)
            if exclude == "sample":
                keep = ids_a[i:i + block, None] != ids_b[None, j:j + block]
            elif exclude == "diag" and i == j:
                np.fill_diagonal(keep, False)
            ba, bb = bk_a[i:i + block], bk_b[j:j + block]
            same = keep & (ba[:, None] == bb[None, :])
            out.count += [np.bincount(ba, keep.sum(1), K), np.bincount(bb, keep.sum(0), K),
                          np.bincount(ba, same.sum(1), K)]
            dist = np.sqrt(sq) if any(k == "laplacian" for k, _ in kernels) else None
            index = _bucket_pair_index(ba, bb, K)
            index[~keep.ravel()] = K * K  # left-out pairs go to the spare bin: no kernel block is masked
            for q, (kernel, bw) in enumerate(kernels):
                _add_bucket_pairs(out.pair_kKK[q], kernel_block(sq, kernel, bw, dist), index)
    # every other sum is a margin of the bucket-pair sums: row k = pairs with i in bucket k, col l = with j in
    # bucket l, same = i and j in one bucket (the diagonal), total = all kept pairs
    out.row_kK[:] = out.pair_kKK.sum(2)
    out.col_kK[:] = out.pair_kKK.sum(1)
    out.same_kK[:] = np.diagonal(out.pair_kKK, axis1=1, axis2=2)
    out.total_k[:] = out.pair_kKK.sum((1, 2))
    return out


@dataclass(frozen=True)
class ExactParts:
    """Exact MMD^2 per kernel (k,), its leave-one-bucket-out replicates (k, K) and non-empty buckets."""

    value_k: np.ndarray
    loo_kK: np.ndarray
    nonempty_K: np.ndarray
    pairs: BucketPairs  # for the cross-fit test (stats.bucket_pair_p)


def exact_parts(x_nd: np.ndarray, y_md: np.ndarray, kernels: list[tuple[str, float]], *, ids_x: np.ndarray,
                ids_y: np.ndarray, bucket_x: np.ndarray, bucket_y: np.ndarray, n_buckets: int,
                estimator: str = "block", block: int = 1024) -> ExactParts:
    """Exact unbiased MMD^2 (sample-block or token-level, as the streamed rows) with jackknife replicates."""
    x_nd, y_md = np.asarray(x_nd, np.float64), np.asarray(y_md, np.float64)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r} (one of {ESTIMATORS})")
    same = "sample" if estimator == "block" else "diag"
    args = dict(kernels=kernels, K=n_buckets, block=block)
    xx = _pair_sums(x_nd, x_nd, ids_x, ids_x, bucket_x, bucket_x, exclude=same, **args)
    yy = _pair_sums(y_md, y_md, ids_y, ids_y, bucket_y, bucket_y, exclude=same, **args)
    xy = _pair_sums(x_nd, y_md, ids_x, ids_y, bucket_x, bucket_y,
                    exclude="sample" if estimator == "block" else "none", **args)
    value = sum(sign * p.total_k / p.count[0].sum() for sign, p in ((1, xx), (1, yy), (-2, xy)))
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = sum(sign * s / c for sign, (s, c) in ((1, xx.loo()), (1, yy.loo()), (-2, xy.loo())))
    nx_K, ny_K = np.bincount(bucket_x, minlength=n_buckets), np.bincount(bucket_y, minlength=n_buckets)
    pairs = BucketPairs(xx.pair_kKK, xy.pair_kKK, yy.pair_kKK, nx_K, ny_K)
    return ExactParts(value, loo, (nx_K + ny_K) > 0, pairs)


def median_bandwidth(pool_nd: np.ndarray, rule: str = "median", max_points: int = 4000,
                     seed: int = 0) -> float:
    """Bandwidth from pairwise distances of a pooled subsample.

    ``median``: s = sqrt(median |x - y|^2) (Gretton et al. 2012's median distance; with an even number of
    pairs the midpoint is taken between squared distances). ``median_sq``: 2 s^2 = median |x - y|^2,
    ``mean_sq``: 2 s^2 = mean |x - y|^2 — the rules under which published numbers are often reported.
    """
    rng = np.random.default_rng(seed)
    if len(pool_nd) > max_points:
        pool_nd = pool_nd[rng.choice(len(pool_nd), max_points, replace=False)]
    sq = _sqdist(np.asarray(pool_nd, np.float64), np.asarray(pool_nd, np.float64))
    sq = np.concatenate([sq[i, i + 1:] for i in range(len(sq) - 1)])  # the pairs i < j, as triu_indices
    if rule == "median":
        bw = float(np.sqrt(np.median(sq)))
    elif rule == "median_sq":
        bw = float(np.sqrt(np.median(sq) / 2))
    elif rule == "mean_sq":
        bw = float(np.sqrt(sq.mean() / 2))
    else:
        raise ValueError(f"unknown bandwidth rule {rule!r}")
    return bw if bw > 0 else 1.0
