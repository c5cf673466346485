"""Random Fourier features and the per-chunk sums every streaming estimator is computed from.

A Gaussian (rbf) or Laplacian kernel is approximated by ``phi(x) = D^-1/2 [cos(W x), sin(W x)]`` so that
``phi(x).phi(y) = mean_j cos(w_j.(x - y)) ~ k(x, y)``. Each frequency is ``w_j = r_j u_j / (s * m)``:
a unit direction ``u_j`` (rows of random rotations when orthogonal, independent otherwise), a radius
``r_j`` drawn for the kernel (chi_d for rbf -> w ~ N(0, I/s^2); chi_d / |N(0,1)| for laplacian ->
multivariate Cauchy, the spectral density of exp(-|x-y|_2 / s)), the bandwidth ``s`` of the median
heuristic and a multiple ``m``. One product ``X U^T`` therefore serves both kernels and every multiple;
L2 normalisation rescales its rows and only standardisation needs its own product.

:func:`chunk_sums` turns one chunk of keys into :class:`Sums`: per sample-bucket sums of the cos and
sin features, of the keys themselves (linear kernel), histogram counts (JSD) and, for small runs,
per-sequence sums (permutation tests). Sums merge by addition, so chunks, threads and dask workers
reduce exactly (up to float64 summation order), and memory never depends on the number of tokens.

Shapes: N tokens (a batch), H heads of a head group, d head dim, D frequencies, C feature configs
(normalisation x kernel x multiple), M normalisations, K sample buckets, P histogram columns, B bins,
R runs (maximal spans of one sample within a chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RF_KERNELS = ("rbf", "laplacian")


@dataclass(frozen=True)
class Frequencies:
    """Unit directions and per-kernel radii; ``w = radius * direction / bandwidth``."""

    directions_Dd: np.ndarray
    radii: dict[str, np.ndarray]  # kernel -> (D,)
    orthogonal: bool
    seed: int


def draw_frequencies(d: int, n_features: int, *, orthogonal: bool, seed: int) -> Frequencies:
    """Seeded frequencies for both RF kernels; orthogonal blocks follow Yu et al. (2016, ORF)."""
    rng = np.random.default_rng([seed, 0x5EED])
    if orthogonal:
        blocks = []
        for _ in range(-(-n_features // d)):
            q_dd, r_dd = np.linalg.qr(rng.standard_normal((d, d)))
            blocks.append(q_dd * np.sign(np.diag(r_dd)))  # Haar-distributed rotation
        directions_Dd = np.concatenate(blocks, axis=1).T[:n_features]
    else:
        g_Dd = rng.standard_normal((n_features, d))
        directions_Dd = g_Dd / np.linalg.norm(g_Dd, axis=1, keepdims=True)
    chi_D = np.sqrt(rng.chisquare(d, n_features))
    cauchy_D = np.sqrt(rng.chisquare(d, n_features)) / np.abs(rng.standard_normal(n_features))
    return Frequencies(np.ascontiguousarray(directions_Dd), {"rbf": chi_D, "laplacian": cauchy_D},
                       orthogonal, seed)


@dataclass(frozen=True)
class FeatureConfig:
    """One random-feature kernel: which key transform, which kernel, which bandwidth multiple."""

    normalisation: str
    kernel: str
    multiple: float


@dataclass
class TargetPlan:
    """Everything one target (a head, or heads pooled) needs to turn keys into sums.

    ``heads`` are positions inside the head group's block; a pooled target stacks their vectors as
    extra samples. ``bandwidth`` maps normalisation -> median-heuristic bandwidth; ``centre_d`` and
    ``scale_d`` define standardisation; ``proj_dP``/``edges_PB`` the histogram columns (raw keys).
    """

    heads: list[int]
    bandwidth: dict[str, float]
    centre_d: np.ndarray
    scale_d: np.ndarray
    proj_dP: np.ndarray | None = None
    edges_PB: np.ndarray | None = None  # (P, B-1) interior quantile edges


@dataclass
class ChunkPlan:
    """What :func:`chunk_sums` computes; shipped to every task (all arrays are small)."""

    freqs: Frequencies | None
    configs: list[FeatureConfig]
    normalisations: list[str]  # for the linear kernel sums (empty: off)
    targets: dict[int, TargetPlan]  # target id (head, or -1 pooled) -> plan
    bucket_ids: np.ndarray  # sorted unique sample ids
    bucket_of: np.ndarray  # bucket of each id in bucket_ids
    n_buckets: int
    dtype: str = "float32"
    batch_rows: int = 2048
    collect_units: bool = False  # per-sequence sums of configs[0], for permutation tests


@dataclass
class Sums:
    """Mergeable sufficient statistics of one target and one modality (see module docstring)."""

    count_K: np.ndarray
    rf_KC2D: np.ndarray
    lin_KMd: np.ndarray
    linsq_KM: np.ndarray
    hist_KPB: np.ndarray
    unit_ids: list[np.ndarray] = field(default_factory=list)
    unit_rf: list[np.ndarray] = field(default_factory=list)  # (R, 2, D) each
    unit_count: list[np.ndarray] = field(default_factory=list)

    def merge(self, other: Sums) -> Sums:
        return Sums(
            self.count_K + other.count_K, self.rf_KC2D + other.rf_KC2D, self.lin_KMd + other.lin_KMd,
            self.linsq_KM + other.linsq_KM, self.hist_KPB + other.hist_KPB,
            self.unit_ids + other.unit_ids, self.unit_rf + other.unit_rf,
            self.unit_count + other.unit_count,
        )

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids_U, rf_U2D, count_U): per-sequence sums with runs of one sample joined."""
        ids_R = np.concatenate(self.unit_ids)
        ids_U, inv_R = np.unique(ids_R, return_inverse=True)
        rf_U2D = np.zeros((len(ids_U),) + self.unit_rf[0].shape[1:])
        np.add.at(rf_U2D, inv_R, np.concatenate(self.unit_rf))
        return ids_U, rf_U2D, np.bincount(inv_R, weights=np.concatenate(self.unit_count))


def empty_sums(plan: ChunkPlan, target: TargetPlan, d: int) -> Sums:
    K, C = plan.n_buckets, len(plan.configs)
    D = plan.freqs.directions_Dd.shape[0] if plan.freqs is not None else 0
    P = 0 if target.proj_dP is None else target.proj_dP.shape[1]
    B = 0 if target.edges_PB is None else target.edges_PB.shape[1] + 1
    M = len(plan.normalisations)
    return Sums(np.zeros(K), np.zeros((K, C, 2, D)), np.zeros((K, M, d)), np.zeros((K, M)),
                np.zeros((K, P, B)))


def normalise(x_Nd: np.ndarray, how: str, target: TargetPlan) -> np.ndarray:
    if how == "none":
        return x_Nd
    if how == "l2":
        return x_Nd / np.maximum(np.linalg.norm(x_Nd, axis=1, keepdims=True), 1e-30)
    if how == "standardize":
        return (x_Nd - target.centre_d) / target.scale_d
    raise ValueError(f"unknown normalisation {how!r}")


def rf_scale(freqs: Frequencies, cfg: FeatureConfig, bandwidth: float) -> np.ndarray:
    """Per-frequency factor turning ``x.u_j`` into ``w_j.x`` for one kernel and bandwidth."""
    return freqs.radii[cfg.kernel] / (bandwidth * cfg.multiple)


def run_starts(sample_ids_N: np.ndarray) -> np.ndarray:
    """Indices where a new run of one sample id starts (tokens of a sample are usually contiguous)."""
    change_N = np.empty(len(sample_ids_N), bool)
    change_N[:1] = True
    np.not_equal(sample_ids_N[1:], sample_ids_N[:-1], out=change_N[1:])
    return np.flatnonzero(change_N)


def _bucket_add(acc_K: np.ndarray, bucket_R: np.ndarray, runs_R: np.ndarray) -> None:
    np.add.at(acc_K, bucket_R, runs_R)


def _add_rf_and_linear(acc: Sums, plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray,
                       starts_R: np.ndarray, bucket_R: np.ndarray, sample_ids_R: np.ndarray,
                       counts_R: np.ndarray) -> None:
    """Add per-bucket cos/sin sums of every config, and key sums per normalisation (linear kernel).

    Features are reduced per run first (``reduceat``), then runs into buckets, config by config, so
    temporaries stay O(N x D) whatever the number of runs.
    """
    freqs = plan.freqs
    z_cache: dict[str, np.ndarray] = {}
    norms_needed = {c.normalisation for c in plan.configs} | set(plan.normalisations)
    for how in sorted(norms_needed):
        xn_Nd = normalise(x_Nd, how, target)
        if how in plan.normalisations:
            m = plan.normalisations.index(how)
            _bucket_add(acc.lin_KMd[:, m], bucket_R, np.add.reduceat(xn_Nd, starts_R, axis=0))
            sq_N = np.einsum("nd,nd->n", xn_Nd, xn_Nd)
            _bucket_add(acc.linsq_KM[:, m], bucket_R, np.add.reduceat(sq_N, starts_R))
        if freqs is None or not any(c.normalisation == how for c in plan.configs):
            continue
        if how == "l2" and "none" in z_cache:  # rows rescale: reuse X U^T
            z_ND = z_cache["none"] / np.maximum(np.linalg.norm(x_Nd, axis=1, keepdims=True), 1e-30)
        else:
            z_ND = xn_Nd @ freqs.directions_Dd.T
        z_cache[how] = z_ND
        for c, cfg in enumerate(plan.configs):
            if cfg.normalisation != how:
                continue
            arg_ND = (z_ND * rf_scale(freqs, cfg, target.bandwidth[how])).astype(plan.dtype)
            runs_R2D = np.stack([
                np.add.reduceat(np.cos(arg_ND), starts_R, axis=0, dtype=np.float64),
                np.add.reduceat(np.sin(arg_ND), starts_R, axis=0, dtype=np.float64)], axis=1)
            _bucket_add(acc.rf_KC2D[:, c], bucket_R, runs_R2D)
            if c == 0 and plan.collect_units:
                acc.unit_ids.append(sample_ids_R)
                acc.unit_rf.append(runs_R2D)
                acc.unit_count.append(counts_R)


def _hist_counts(target: TargetPlan, x_Nd: np.ndarray, bucket_N: np.ndarray, K: int) -> np.ndarray:
    """Counts (K, P, B) of the histogram columns ``x @ proj`` in their shared quantile bins."""
    vals_NP = x_Nd @ target.proj_dP
    P, B = target.proj_dP.shape[1], target.edges_PB.shape[1] + 1
    bins_NP = np.empty(vals_NP.shape, np.int64)
    for p in range(P):
        bins_NP[:, p] = np.searchsorted(target.edges_PB[p], vals_NP[:, p], side="right")
    flat_NP = (bucket_N[:, None] * P + np.arange(P)) * B + bins_NP
    return np.bincount(flat_NP.ravel(), minlength=K * P * B).reshape(K, P, B).astype(np.float64)


def _target_rows(block_NHd: np.ndarray, sample_ids_N: np.ndarray, target: TargetPlan,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of one target in sample order: a head's column, or the heads stacked per token."""
    if len(target.heads) == 1:
        return block_NHd[:, target.heads[0]], sample_ids_N
    x_NHd = block_NHd[:, target.heads]
    return x_NHd.reshape(-1, x_NHd.shape[-1]), np.repeat(sample_ids_N, len(target.heads))


def _add_batch(acc: Sums, plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray,
               sample_ids_N: np.ndarray) -> None:
    bucket_N = plan.bucket_of[np.searchsorted(plan.bucket_ids, sample_ids_N)]
    starts_R = run_starts(sample_ids_N)
    bucket_R = bucket_N[starts_R]
    counts_R = np.diff(np.append(starts_R, len(x_Nd))).astype(np.float64)
    _bucket_add(acc.count_K, bucket_R, counts_R)
    _add_rf_and_linear(acc, plan, target, x_Nd, starts_R, bucket_R, sample_ids_N[starts_R], counts_R)
    if target.proj_dP is not None:
        acc.hist_KPB += _hist_counts(target, x_Nd, bucket_N, plan.n_buckets)


def chunk_sums(block_NHd: np.ndarray, sample_ids_N: np.ndarray, plan: ChunkPlan) -> dict[int, Sums]:
    """Sums of every target of ``plan`` over one chunk of keys (the unit of streamed work)."""
    out: dict[int, Sums] = {}
    for tid, target in plan.targets.items():
        acc = empty_sums(plan, target, block_NHd.shape[-1])
        D = plan.freqs.directions_Dd.shape[0] if plan.freqs is not None else 1
        rows = max(1, min(plan.batch_rows, 2**24 // D) // len(target.heads))  # temporaries ~ rows x D
        for lo in range(0, len(block_NHd), rows):
            batch_NHd = np.asarray(block_NHd[lo:lo + rows], dtype=np.float64)
            x_Nd, sid_N = _target_rows(batch_NHd, sample_ids_N[lo:lo + rows], target)
            _add_batch(acc, plan, target, x_Nd, sid_N)
        out[tid] = acc
    return out


def merge_sums(a: dict[int, Sums], b: dict[int, Sums]) -> dict[int, Sums]:
    return {k: a[k].merge(b[k]) for k in a}


def single_target_plan(d: int, *, n_features: int, bandwidth: float, sample_ids: np.ndarray,
                       kernels: tuple[str, ...] = ("rbf",), multiples: tuple[float, ...] = (1.0,),
                       orthogonal: bool = True, seed: int = 0, n_buckets: int = 1,
                       collect_units: bool = False, dtype: str = "float32",
                       batch_rows: int = 2048) -> ChunkPlan:
    """A plan for plain (N, d) arrays — one target, no normalisation; used by the benchmark and tests.

    Buckets are assigned round-robin over the sorted unique ``sample_ids``.
    """
    ids = np.unique(sample_ids)
    target = TargetPlan(heads=[0], bandwidth={"none": bandwidth}, centre_d=np.zeros(d), scale_d=np.ones(d))
    configs = [FeatureConfig("none", k, m) for k in kernels for m in multiples]
    return ChunkPlan(draw_frequencies(d, n_features, orthogonal=orthogonal, seed=seed), configs, [],
                     {0: target}, ids, np.arange(len(ids)) % n_buckets, n_buckets, dtype, batch_rows,
                     collect_units)
