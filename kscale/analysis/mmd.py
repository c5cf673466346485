"""MMD^2 estimators: from mergeable feature sums (streaming) and exact on a subsample (blocked).

Streaming estimators see a comparison as two :class:`Side` objects, the per-bucket feature sums of
the X and Y tokens (``features.Sums`` restricted to one modality and a set of sample buckets). With
``phi(x).phi(y) ~ k(x, y)`` the unbiased U-statistic needs only totals::

    MMD^2_u = (|S_x|^2 - Q_x) / (n(n-1)) + (|S_y|^2 - Q_y) / (m(m-1)) - 2 S_x.S_y / (n m)

where ``Q = sum |phi(x)|^2`` (= n for random features, sum |x|^2 for the linear kernel). The random
feature value is the mean over frequencies of per-frequency terms ``t_j``; their spread gives the
approximation error ``sd(t_j) / sqrt(D)``. Sampling errors and p-values live in ``stats.py``.

The exact estimator (:func:`exact_mmd2`) accumulates kernel sums block by block in float64 and also
returns each point's witness value, from which ``stats.clustered_witness_se`` gets its error.

Shapes: K buckets, F features (2D for random features), D frequencies, n/m points, b block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Side:
    """Per-bucket sums of one side: ``n_K`` points, feature sums ``feat_KF``, ``sq_K = sum |phi|^2``."""

    n_K: np.ndarray
    feat_KF: np.ndarray
    sq_K: np.ndarray

    @property
    def n(self) -> float:
        return float(self.n_K.sum())

    def total(self) -> np.ndarray:
        return self.feat_KF.sum(axis=0)

    def restrict(self, keep_K: np.ndarray) -> Side:
        keep = keep_K.astype(float)
        return Side(self.n_K * keep, self.feat_KF * keep[:, None], self.sq_K * keep)


def rf_side(count_K: np.ndarray, rf_K2D: np.ndarray) -> Side:
    """A side from cos/sin sums: features scaled by D^-1/2, each with |phi|^2 = 1 exactly."""
    K, _, D = rf_K2D.shape
    return Side(count_K, rf_K2D.reshape(K, 2 * D) / np.sqrt(D), count_K.copy())


def linear_side(count_K: np.ndarray, lin_Kd: np.ndarray, linsq_K: np.ndarray) -> Side:
    return Side(count_K, lin_Kd, linsq_K)


def mmd2_from_sums(x: Side, y: Side, *, biased: bool = False) -> float:
    """Unbiased (U) or biased (V) MMD^2 from the sums of two sides."""
    sx, sy, n, m = x.total(), y.total(), x.n, y.n
    if biased:
        diff = sx / n - sy / m
        return float(diff @ diff)
    return float((sx @ sx - x.sq_K.sum()) / (n * (n - 1)) + (sy @ sy - y.sq_K.sum()) / (m * (m - 1))
                 - 2 * (sx @ sy) / (n * m))


def rf_frequency_terms(x: Side, y: Side) -> np.ndarray:
    """Per-frequency unbiased terms ``t_j`` (D,), whose mean is the random-feature MMD^2_u."""
    D = x.feat_KF.shape[1] // 2
    sx_2D = x.total().reshape(2, D) * np.sqrt(D)
    sy_2D = y.total().reshape(2, D) * np.sqrt(D)
    n, m = x.n, y.n
    xx = ((sx_2D**2).sum(0) - n) / (n * (n - 1))
    yy = ((sy_2D**2).sum(0) - m) / (m * (m - 1))
    return xx + yy - 2 * (sx_2D * sy_2D).sum(0) / (n * m)


def rf_mmd2(x: Side, y: Side) -> tuple[float, float]:
    """(MMD^2_u, approximation SD) of the random-feature estimate."""
    t_D = rf_frequency_terms(x, y)
    return float(t_D.mean()), float(t_D.std(ddof=1) / np.sqrt(len(t_D)))


# --- exact, on a subsample -------------------------------------------------------------------------

def kernel_block(sqdist_bb: np.ndarray, kernel: str, bandwidth: float) -> np.ndarray:
    """Kernel values from squared distances: rbf exp(-r^2/2s^2), laplacian exp(-r/s)."""
    if kernel == "rbf":
        return np.exp(-sqdist_bb / (2.0 * bandwidth**2))
    if kernel == "laplacian":
        return np.exp(-np.sqrt(sqdist_bb) / bandwidth)
    raise ValueError(f"unknown kernel {kernel!r}")


def _sqdist(a_bd: np.ndarray, b_bd: np.ndarray) -> np.ndarray:
    sq = (a_bd**2).sum(1)[:, None] + (b_bd**2).sum(1)[None, :] - 2.0 * a_bd @ b_bd.T
    return np.maximum(sq, 0.0)


def _row_sums(a_nd: np.ndarray, b_md: np.ndarray, kernels: list[tuple[str, float]], same: bool,
              block: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column sums (len(kernels), n) / (len(kernels), m) of k(a_i, b_j), float64 blocks.

    With ``same`` (a is b) the diagonal is left out: k(x, x) enters the estimators only through n.
    """
    rows_kn = np.zeros((len(kernels), len(a_nd)))
    cols_km = np.zeros((len(kernels), len(b_md)))
    for i in range(0, len(a_nd), block):
        for j in range(0, len(b_md), block):
            sq = _sqdist(a_nd[i:i + block], b_md[j:j + block])
            if same and i == j:
                np.fill_diagonal(sq, np.inf)
            for k, (kernel, bw) in enumerate(kernels):
                kb = kernel_block(sq, kernel, bw)
                rows_kn[k, i:i + block] += kb.sum(1)
                cols_km[k, j:j + block] += kb.sum(0)
    return rows_kn, cols_km


@dataclass(frozen=True)
class ExactResult:
    """Exact MMD^2 per kernel, and witness values at every point (for clustered SEs)."""

    value_k: np.ndarray
    witness_x_kn: np.ndarray  # f(x_i) = mean_j' k(x_i, x_j') - mean_j k(x_i, y_j)
    witness_y_km: np.ndarray  # f(y_i) likewise, same sign convention
    n: int
    m: int


def exact_mmd2(x_nd: np.ndarray, y_md: np.ndarray, kernels: list[tuple[str, float]], *,
               biased: bool = False, block: int = 1024) -> ExactResult:
    """Exact MMD^2 for several (kernel, bandwidth) pairs sharing one pass of distance blocks.

    Kernels are rbf or laplacian (k(x, x) = 1); the linear kernel is exact from sums already.
    """
    x_nd, y_md = np.asarray(x_nd, np.float64), np.asarray(y_md, np.float64)
    n, m = len(x_nd), len(y_md)
    kxx_kn, _ = _row_sums(x_nd, x_nd, kernels, True, block)
    kyy_km, _ = _row_sums(y_md, y_md, kernels, True, block)
    kxy_kn, kyx_km = _row_sums(x_nd, y_md, kernels, False, block)
    if biased:
        value = (kxx_kn.sum(1) + n) / n**2 + (kyy_km.sum(1) + m) / m**2 - 2 * kxy_kn.sum(1) / (n * m)
    else:
        value = kxx_kn.sum(1) / (n * (n - 1)) + kyy_km.sum(1) / (m * (m - 1)) - 2 * kxy_kn.sum(1) / (n * m)
    wx = kxx_kn / (n - 1) - kxy_kn / m
    wy = kyx_km / n - kyy_km / (m - 1)
    return ExactResult(value, wx, wy, n, m)


def median_bandwidth(pool_nd: np.ndarray, rule: str = "median", max_points: int = 4000,
                     seed: int = 0) -> float:
    """Bandwidth from pairwise distances of a pooled subsample.

    ``median``: s = median |x - y| (Gretton et al. 2012). ``median_sq``: 2 s^2 = median |x - y|^2,
    ``mean_sq``: 2 s^2 = mean |x - y|^2 — the rules under which published numbers are often reported.
    """
    rng = np.random.default_rng(seed)
    if len(pool_nd) > max_points:
        pool_nd = pool_nd[rng.choice(len(pool_nd), max_points, replace=False)]
    sq = _sqdist(np.asarray(pool_nd, np.float64), np.asarray(pool_nd, np.float64))
    sq = sq[np.triu_indices(len(pool_nd), 1)]
    if rule == "median":
        bw = float(np.sqrt(np.median(sq)))
    elif rule == "median_sq":
        bw = float(np.sqrt(np.median(sq) / 2))
    elif rule == "mean_sq":
        bw = float(np.sqrt(sq.mean() / 2))
    else:
        raise ValueError(f"unknown bandwidth rule {rule!r}")
    return bw if bw > 0 else 1.0
