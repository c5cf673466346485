"""Random Fourier features and the per-chunk sums every streaming estimator is computed from.

A Gaussian (rbf) or Laplacian kernel is approximated by ``phi(x) = D^-1/2 [cos(W x), sin(W x)]`` so that
``phi(x).phi(y) = mean_j cos(w_j.(x - y)) ~ k(x, y)``. Each frequency is ``w_j = r_j u_j / (s * m)``:
a unit direction ``u_j`` (rows of random rotations when orthogonal, independent otherwise), a radius
``r_j`` drawn for the kernel (chi_d for rbf -> w ~ N(0, I/s^2); chi_d / |N(0,1)| for laplacian ->
multivariate Cauchy, the spectral density of exp(-|x-y|_2 / s)), the bandwidth ``s`` of the median
heuristic and a multiple ``m``. One product ``X U^T`` therefore serves both kernels and every multiple;
L2 normalisation rescales its rows and only standardisation needs its own product.

:func:`chunk_sums` turns one joint block (whole samples, every modality: ``source.joint_items``) into
:class:`TargetSums` per target: per sample-bucket sums of the cos and sin features, of the keys
themselves (linear kernel) and histogram counts (JSD); and, from per-sample sums S_s, the within-sample
terms the sample-block estimators subtract: sum_s |S_s|^2 per modality, sum_s S_s(image).S_s(text)
across modalities, sum_s n_s^2 and sum_s n_s m_s. Per-sample sums of the primary config are kept for
permutation tests while the samples are few. Sums merge by addition, so blocks, threads and dask
workers reduce exactly (up to float64 summation order), and memory never depends on the number of tokens.

Shapes: N tokens (a batch), H heads of a head group, d head dim, D frequencies, C feature configs
(normalisation x kernel x multiple), M normalisations, K sample buckets, P histogram columns, B bins,
S samples of a block, U sequences (sample, modality) kept for permutations.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from kscale.analysis.source import Buckets, TableBuckets

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
    buckets: Buckets | TableBuckets
    dtype: str = "float32"
    batch_rows: int = 2048
    max_units: int = 0  # keep per-sequence sums of configs[0] while there are at most this many
    backend: str = "numpy"  # numpy | torch (torch: on the worker's GPU when it has one)
    threads: int = 1  # threads of one call's numpy random features (dask already runs a task per core)

    @property
    def n_buckets(self) -> int:
        return self.buckets.n_buckets


@dataclass
class Sums:
    """Mergeable sufficient statistics of one target and one modality (see module docstring).

    ``rfself_KCD`` / ``linself_KM`` are sum_s |S_s|^2 over samples (per frequency for random features),
    ``nsq_K`` is sum_s n_s^2: what the sample-block U-statistic leaves out of sum_{i != j}.
    """

    count_K: np.ndarray
    samples_K: np.ndarray
    nsq_K: np.ndarray
    rf_KC2D: np.ndarray
    rfself_KCD: np.ndarray
    lin_KMd: np.ndarray
    linsq_KM: np.ndarray
    linself_KM: np.ndarray
    hist_KPB: np.ndarray
    unit_ids: list[np.ndarray] = field(default_factory=list)
    unit_rf: list[np.ndarray] = field(default_factory=list)  # (S, 2, D) each
    unit_count: list[np.ndarray] = field(default_factory=list)
    units_dropped: bool = False

    def merge(self, other: Sums, max_units: int = 0) -> Sums:
        """Add ``other`` into these sums, in place (the reducer owns its accumulator), and return them."""
        drop = self.units_dropped or other.units_dropped or (
            sum(map(len, self.unit_ids)) + sum(map(len, other.unit_ids)) > max_units)
        for name in _ARRAYS:
            getattr(self, name).__iadd__(getattr(other, name))
        for name in ("unit_ids", "unit_rf", "unit_count"):
            setattr(self, name, [] if drop else getattr(self, name) + getattr(other, name))
        self.units_dropped = drop
        return self

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids_U, rf_U2D, count_U): per-sequence sums (a sample lies in one block: no joins)."""
        return np.concatenate(self.unit_ids), np.concatenate(self.unit_rf), np.concatenate(self.unit_count)


_ARRAYS = ("count_K", "samples_K", "nsq_K", "rf_KC2D", "rfself_KCD", "lin_KMd", "linsq_KM", "linself_KM",
           "hist_KPB")


@dataclass
class TargetSums:
    """One target's Sums per modality and the cross-modal within-sample terms of the sample-block
    cross comparison: ``rfcross_KCD`` = sum_s S_s(x).S_s(y) per frequency, ``lincross_KM`` likewise for
    keys, ``ncross_K`` = sum_s n_s m_s, ``union_K`` = samples with tokens of either modality."""

    by_mod: dict[str, Sums]
    rfcross_KCD: np.ndarray
    lincross_KM: np.ndarray
    ncross_K: np.ndarray
    union_K: np.ndarray

    def merge(self, other: TargetSums, max_units: int = 0) -> TargetSums:
        """Add ``other`` in place and return self."""
        for m, s in self.by_mod.items():
            s.merge(other.by_mod[m], max_units)
        for name in ("rfcross_KCD", "lincross_KM", "ncross_K", "union_K"):
            getattr(self, name).__iadd__(getattr(other, name))
        return self


def empty_sums(plan: ChunkPlan, target: TargetPlan, d: int) -> Sums:
    K, C, M = plan.n_buckets, len(plan.configs), len(plan.normalisations)
    D = plan.freqs.directions_Dd.shape[0] if plan.freqs is not None else 0
    P, B = (0, 0) if target.proj_dP is None else (target.proj_dP.shape[1], target.edges_PB.shape[1] + 1)
    z = np.zeros
    return Sums(z(K), z(K), z(K), z((K, C, 2, D)), z((K, C, D)), z((K, M, d)), z((K, M)), z((K, M)),
                z((K, P, B)))


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
    """Indices where a new run of one sample id starts (a sample's rows are contiguous)."""
    change_N = np.empty(len(sample_ids_N), bool)
    change_N[:1] = True
    np.not_equal(sample_ids_N[1:], sample_ids_N[:-1], out=change_N[1:])
    return np.flatnonzero(change_N)


def _bucket_add(acc_K: np.ndarray, bucket_S: np.ndarray, per_sample_S: np.ndarray) -> None:
    """acc[k] += sum of per-sample rows in bucket k (a one-hot product: np.add.at is slow on wide rows)."""
    if per_sample_S.size == 0:
        return
    if per_sample_S.ndim == 1:
        acc_K += np.bincount(bucket_S, weights=per_sample_S, minlength=len(acc_K))
        return
    onehot_KS = np.zeros((len(acc_K), len(bucket_S)))
    onehot_KS[bucket_S, np.arange(len(bucket_S))] = 1.0
    acc_K += (onehot_KS @ per_sample_S.reshape(len(bucket_S), -1)).reshape(acc_K.shape)


@dataclass(frozen=True)
class BlockSamples:
    """The samples of one modality in a block: ids (S,), each row's sample index (N,), rows per sample."""

    ids_S: np.ndarray
    index_N: np.ndarray
    count_S: np.ndarray

    @staticmethod
    def of(sample_ids_N: np.ndarray) -> BlockSamples:
        starts = run_starts(sample_ids_N)
        index_N = np.zeros(len(sample_ids_N), np.int64)
        index_N[starts[1:]] = 1
        return BlockSamples(sample_ids_N[starts], np.cumsum(index_N), np.diff(np.r_[starts, len(sample_ids_N)]))


def _per_sample_rf(plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples,
                   ) -> np.ndarray:
    """Per-sample cos/sin sums (S, C, 2, D) of every config: torch where ``plan.backend`` asks for it,
    else the compiled kernel's path (:func:`_per_sample_rf_kernel`) for float32 when the kernel loads,
    else the fast numpy path (:func:`_per_sample_rf_fast`)."""
    if plan.backend != "numpy":
        from kscale.analysis.gpu import per_sample_rf_torch, torch_device

        device = torch_device(plan.backend)
        if device is not None:
            return per_sample_rf_torch(plan, target, x_Nd, smp, device)
    lib = _rf_kernel(plan)
    if lib is not None:
        return _per_sample_rf_kernel(plan, target, x_Nd, smp, lib)
    return _per_sample_rf_fast(plan, target, x_Nd, smp)


def _rf_kernel(plan: ChunkPlan):
    """The compiled kernel (:mod:`kscale.analysis.rfkernel`) for float32 plans when it loads, else None
    (float64 plans always run the numpy path)."""
    if np.dtype(plan.dtype) != np.float32:
        return None
    from kscale.analysis import rfkernel

    return rfkernel.kernel()


def _per_sample_rf_reference(plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples,
                             ) -> np.ndarray:
    """The numpy path before the tiled one (kept for ``bench/rf_throughput.py`` and the tests): one
    thread, ``batch_rows`` x D temporaries, float64 sums run by run in row order.

    One product ``X U^T`` per normalisation serves every kernel and multiple; l2 rows reuse the raw one.
    """
    freqs, D = plan.freqs, plan.freqs.directions_Dd.shape[0]
    out = np.zeros((len(smp.ids_S), len(plan.configs), 2, D))
    rows = _batch_rows(plan)
    # Buffers reused across configs and batches: fresh N x D temporaries cost more in page faults than
    # the arithmetic. Values are those of (z * scale).astype(dtype), cos/sin, float64 sums in row order.
    arg_buf = np.empty((min(rows, len(x_Nd)), D), plan.dtype)
    trig_buf = np.empty_like(arg_buf)
    for lo in range(0, len(x_Nd), rows):
        xb_Nd, idx_N = np.asarray(x_Nd[lo:lo + rows], np.float64), smp.index_N[lo:lo + rows]
        runs = _runs(idx_N)
        arg_ND, trig_ND = arg_buf[:len(xb_Nd)], trig_buf[:len(xb_Nd)]
        z_cache: dict[str, np.ndarray] = {}
        for c, cfg in enumerate(plan.configs):
            z_ND = _projection(xb_Nd, cfg.normalisation, target, freqs, z_cache)
            np.multiply(z_ND, rf_scale(freqs, cfg, target.bandwidth[cfg.normalisation]), out=arg_ND,
                        casting="same_kind")
            for part, trig in ((0, np.cos), (1, np.sin)):
                trig(arg_ND, out=trig_ND)
                _add_runs(out[:, c, part], trig_ND, idx_N, runs)
    return out


def _batch_rows(plan: ChunkPlan) -> int:
    """Rows per projection batch: ``batch_rows``, capped so that an N x D temporary stays ~128 MB."""
    return max(1, min(plan.batch_rows, 2**24 // plan.freqs.directions_Dd.shape[0]))


_TILE_VALUES = 2**17  # rows x D values of one tile (32 rows at D = 4096): its temporaries stay in cache
_TILE_ROWS = 256  # and at most this many rows (the run indicator of a tile is rows x rows at worst)


def _per_sample_rf_tiled(plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples,
                         ) -> np.ndarray:
    """Per-sample cos/sin sums (S, C, 2, D), the values of :func:`_per_sample_rf_reference` to float64
    rounding (the float32 arguments and cos/sin are the same bits; only the order of the float64 sums
    differs), at several times its speed.

    Per batch of ``batch_rows`` rows the projections ``X U^T`` are the reference's (same product, same
    shapes: the same float64 values). The rows are then split into contiguous parts, 4 per thread, queued
    on ``plan.threads`` threads (numpy releases the GIL inside its loops; a thread slowed by other load
    takes fewer parts), and each part walks tiles of ~``_TILE_VALUES``
    values: per config the argument (``_arg_steps``: one float64 product rounded to the dtype, or an exact
    power-of-two multiple of another config's), cos and sin written as float64, and the run sums of the
    tile as one product (segment indicator @ values, float64 BLAS) added into ``out``. A part writes its
    samples' rows of ``out`` directly, except the sample it shares with the part before it (its first run
    started there): that sum goes to a private row, added after the join. No two parts write one row.
    """
    freqs, D, C = plan.freqs, plan.freqs.directions_Dd.shape[0], len(plan.configs)
    out = np.zeros((len(smp.ids_S), C, 2, D))
    steps = _arg_steps(plan, target)
    rows = _batch_rows(plan)
    tile = max(1, min(rows, _TILE_ROWS, _TILE_VALUES // D))
    threads = max(1, plan.threads)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for lo in range(0, len(x_Nd), rows):
            xb_Nd, idx_N = np.asarray(x_Nd[lo:lo + rows], np.float64), smp.index_N[lo:lo + rows]
            z_cache: dict[str, np.ndarray] = {}
            for how in steps:
                _projection(xb_Nd, "none" if how == "l2" else how, target, freqs, z_cache)
            norm_N1 = None
            if "l2" in steps:  # the reference's l2 projection, row by row: raw / max(|x|, 1e-30)
                norm_N1 = np.maximum(np.linalg.norm(xb_Nd, axis=1, keepdims=True), 1e-30)
            n_parts = min(len(xb_Nd), 1 if pool is None else 4 * threads)  # queued: a slow thread takes fewer
            bounds = np.linspace(0, len(xb_Nd), n_parts + 1).round().astype(int)
            parts = [(a, b) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()) if b > a]
            work = [(_TileWork(plan.dtype, steps, z_cache, norm_N1, idx_N, tile, D, C), a, b) for a, b in parts]
            if pool is None:
                shared = [w.run(out, a, b) for w, a, b in work]
            else:
                shared = [f.result() for f in [pool.submit(w.run, out, a, b) for w, a, b in work]]
            for sample, row in shared:
                if row is not None:
                    out[sample] += row
    finally:
        if pool is not None:
            pool.shutdown()
    return out


@dataclass(frozen=True)
class _ArgStep:
    """How one config's argument is made: ``dtype(z * scale_D)`` from its normalisation's projection, or,
    when ``source`` >= 0, config ``source``'s argument times ``factor``, an exact power of two."""

    config: int
    scale_D: np.ndarray | None
    source: int = -1
    factor: float = 1.0


def _arg_steps(plan: ChunkPlan, target: TargetPlan) -> dict[str, list[_ArgStep]]:
    """Per normalisation, the argument steps of its configs (each source before the configs it serves).

    Bandwidth multiples that differ by a power of two (the default 0.5, 1, 2) have scales that differ by
    exactly that factor, so ``dtype(z * s * 2**k) == dtype(z * s) * 2**k`` bit for bit (power-of-two
    scaling commutes with rounding; only results in the dtype's subnormal range, |arg| < 1.2e-38 in float32,
    could differ, by less than 1e-45): one float64 product and rounding serves all of them.
    """
    freqs = plan.freqs
    steps: dict[str, list[_ArgStep]] = {}
    for c, cfg in enumerate(plan.configs):
        scale_D = rf_scale(freqs, cfg, target.bandwidth[cfg.normalisation])
        group = steps.setdefault(cfg.normalisation, [])
        base = next((st for st in group if st.source < 0 and _power_of_two(scale_D, st.scale_D) is not None),
                    None)
        if base is None:
            group.append(_ArgStep(c, scale_D))
        else:
            group.append(_ArgStep(c, None, base.config, _power_of_two(scale_D, base.scale_D)))
    return steps


def _power_of_two(a_D: np.ndarray, b_D: np.ndarray) -> float | None:
    """f with ``a == b * f`` exactly in every entry and f a power of two, else None."""
    if not len(a_D) or b_D[0] == 0 or not np.isfinite(b_D[0]):
        return None
    f = float(a_D[0] / b_D[0])
    if not np.isfinite(f) or f <= 0 or np.frexp(f)[0] != 0.5:
        return None
    return f if np.array_equal(b_D * f, a_D) else None


class _TileWork:
    """One thread's rows [a, b) of a batch: arguments, cos/sin and run sums, tile by tile."""

    def __init__(self, dtype: str, steps: dict[str, list[_ArgStep]], z: dict[str, np.ndarray],
                 norm_N1: np.ndarray | None, idx_N: np.ndarray, tile: int, D: int, C: int):
        self.dtype, self.steps, self.z, self.norm_N1, self.idx_N = dtype, steps, z, norm_N1, idx_N
        self.tile, self.D, self.C = tile, D, C

    def run(self, out: np.ndarray, a: int, b: int) -> tuple[int, np.ndarray | None]:
        """Add the sums of rows [a, b) into ``out``; returns (sample, row) of the sample shared with the
        part before ``a`` (row None when there is none), which the caller adds after every part is done."""
        idx_N, tile, D, C = self.idx_N, self.tile, self.D, self.C
        shared = int(idx_N[a]) if a > 0 and idx_N[a] == idx_N[a - 1] else -1
        private = np.zeros((C, 2, D)) if shared >= 0 else None
        n = min(tile, b - a)
        zbuf = np.empty((n, D)) if self.norm_N1 is not None else None
        args = {st.config: np.empty((n, D), self.dtype) for g in self.steps.values() for st in g
                if st.source < 0}
        derived = np.empty((n, D), self.dtype)
        vals = np.empty((n, D))
        for t in range(a, b, tile):
            te = min(t + tile, b)
            seg = _Segments(idx_N, t, te, out, shared, private)
            for how, group in self.steps.items():
                z_TD = self._z(how, t, te, zbuf)
                for st in group:
                    if st.source < 0:
                        arg = args[st.config][:te - t]
                        np.multiply(z_TD, st.scale_D, out=arg, casting="same_kind")
                    else:
                        arg = np.multiply(args[st.source][:te - t], np.asarray(st.factor, self.dtype),
                                          out=derived[:te - t])
                    for part, trig in ((0, np.cos), (1, np.sin)):
                        v = vals[:te - t]
                        trig(arg, out=v, dtype=self.dtype)  # the dtype's cos, held exactly in float64
                        seg.add(v, st.config, part)
        return shared, private

    def _z(self, how: str, t: int, te: int, zbuf: np.ndarray | None) -> np.ndarray:
        if how != "l2":
            return self.z[how][t:te]
        return np.divide(self.z["none"][t:te], self.norm_N1[t:te], out=zbuf[:te - t])


class _Segments:
    """The runs of one sample inside a tile [t, te): their float64 sums as one BLAS product
    (indicator (R, T) @ values (T, D)), added to ``out[sample]`` or to the private row of ``shared``."""

    def __init__(self, idx_N: np.ndarray, t: int, te: int, out: np.ndarray, shared: int,
                 private: np.ndarray | None):
        starts = run_starts(idx_N[t:te])
        ends = np.r_[starts[1:], te - t]
        samples = idx_N[t + starts]
        self.dest = [private if s == shared else out[s] for s in samples.tolist()]
        if len(starts) == 1:
            self.ind_RT = np.ones((1, te - t))
        else:
            self.ind_RT = np.zeros((len(starts), te - t))
            for r, (s0, s1) in enumerate(zip(starts.tolist(), ends.tolist())):
                self.ind_RT[r, s0:s1] = 1.0
        self.sums_RD = np.empty((len(starts), out.shape[-1]))

    def add(self, vals_TD: np.ndarray, c: int, part: int) -> None:
        np.matmul(self.ind_RT, vals_TD, out=self.sums_RD)
        for r, dest in enumerate(self.dest):
            dest[c, part] += self.sums_RD[r]


_BLOCK_ROWS = 128  # rows of one work item of the fast path: its own projections (4 MB each at D = 4096)
_FAST_TILE_VALUES = 2**15  # rows x D values of one elementwise tile of the fast path (16 rows at D = 4096)


def _per_sample_rf_fast(plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples,
                        ) -> np.ndarray:
    """Per-sample cos/sin sums (S, C, 2, D) of every config, the values of :func:`_per_sample_rf_reference`
    to float64 rounding (the float32 arguments and cos/sin values are the same bits; only the order of the
    float64 sums differs), at several times its speed (issue 26; ``bench/rf_throughput.py``).

    The rows are cut into blocks of ~``_BLOCK_ROWS`` inside the reference's batches (:func:`_fast_blocks`),
    queued on ``plan.threads`` threads (numpy and BLAS release the GIL). A block makes its own projections
    ``X U^T`` (numpy's BLAS gives a product of >= 2 rows the bits of any larger product holding those rows,
    so they are the reference's values) into buffers the thread reuses, then walks tiles of
    ~``_FAST_TILE_VALUES`` values that stay in cache: per config the argument (``_arg_steps``: one float64
    product rounded to the dtype, or an exact power-of-two multiple of another config's), stacked per
    normalisation so that one cos and one sin in the dtype (numpy's float32 loops, the reference's bits)
    serve the stack, and their float64 column sums per run (:class:`_RunSums`). A block writes the rows
    of ``out`` of the samples that start in it; the sum of a sample that started in an earlier block goes
    to a private row added after the join.
    """
    return _run_blocks(_FastWork, plan, target, x_Nd, smp)


def _run_blocks(work_cls, plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples) -> np.ndarray:
    """The (S, C, 2, D) sums of a block-parallel layout (``work_cls``: :class:`_FastWork` or
    :class:`_StackWork`): its blocks of rows on ``plan.threads`` threads (BLAS on one thread each), then
    the private rows of samples shared with an earlier block added after the join."""
    D, C = plan.freqs.directions_Dd.shape[0], len(plan.configs)
    out = np.zeros((len(smp.ids_S), C, 2, D))
    blocks = _fast_blocks(len(x_Nd), _batch_rows(plan), _BLOCK_ROWS)
    work = work_cls(plan, target, x_Nd, smp.index_N, out)
    threads = max(1, min(plan.threads, len(blocks)))
    if threads == 1:
        shared = [work.run(a, b) for a, b in blocks]
    else:
        with _one_blas_thread(), ThreadPoolExecutor(threads) as pool:
            shared = list(pool.map(lambda ab: work.run(*ab), blocks))
    for sample, row in shared:
        if row is not None:
            out[sample] += row
    return out


def _one_blas_thread():
    """While the fast path's own threads run, BLAS gets one thread per call (:func:`kscale.analysis.blas.one_thread`;
    measured: ~1.6x the CPU time with 2 workers x 2 OpenBLAS threads)."""
    from kscale.analysis.blas import one_thread

    return one_thread()


def _shared_sample(idx_N: np.ndarray, a: int, C: int, D: int) -> tuple[int, np.ndarray | None]:
    """The sample a block starting at row ``a`` shares with the rows before it (-1: none) and the private
    (C, 2, D) row its sums go to (added by :func:`_run_blocks` after the join), for both layouts."""
    shared = int(idx_N[a]) if a > 0 and idx_N[a] == idx_N[a - 1] else -1
    return shared, (np.zeros((C, 2, D)) if shared >= 0 else None)


def _fast_blocks(n: int, batch_rows: int, block_rows: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of about ``block_rows`` that never cross a reference batch of ``batch_rows`` and
    never hold one row unless that batch does (a one-row product is a matrix-vector product in BLAS: other
    bits)."""
    blocks = []
    for lo in range(0, n, batch_rows):
        hi = min(lo + batch_rows, n)
        cuts = list(range(lo, hi, block_rows)) + [hi]
        if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
            del cuts[-2]
        blocks += list(zip(cuts[:-1], cuts[1:]))
    return blocks


class _FastWork:
    """The work of :func:`_per_sample_rf_fast` on one block of rows; buffers are per thread and reused.

    A normalisation's configs are one group: their arguments are stacked (G, T, D) so that one cos, one
    sin and one run reduction per part serve the whole group (fewer, larger numpy calls)."""

    def __init__(self, plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, idx_N: np.ndarray,
                 out: np.ndarray):
        self.plan, self.target, self.x_Nd, self.idx_N, self.out = plan, target, x_Nd, idx_N, out
        self.groups = {how: _Group.of(group) for how, group in _arg_steps(plan, target).items()}
        self.U_dD = plan.freqs.directions_Dd.T
        self.D, self.C = self.U_dD.shape[1], len(plan.configs)
        self.tile = max(1, min(_TILE_ROWS, _FAST_TILE_VALUES // self.D))
        self.rows = max((b - a for a, b in _fast_blocks(len(x_Nd), _batch_rows(plan), _BLOCK_ROWS)), default=0)
        self.local = threading.local()

    def _buffers(self) -> SimpleNamespace:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            n, D, dt = self.tile, self.D, self.plan.dtype
            G = max(len(g.steps) for g in self.groups.values())
            buf = SimpleNamespace(z=self._projection_buffers(), zl2=np.empty((n, D)),
                                  args=np.empty((G, n, D), dt), vals=np.empty((G, n, D), dt),
                                  vals64=np.empty((G, n, D)), sums_G1D=np.empty((G, 1, D)),
                                  ones_1T=np.ones((1, n)))
            self.local.buf = buf
        return buf

    def run(self, a: int, b: int) -> tuple[int, np.ndarray | None]:
        """Add the sums of rows [a, b) into ``out``; returns (sample, row) of the sample shared with the
        rows before ``a`` (row None when there is none), which the caller adds after every block is done."""
        idx_N, D, C = self.idx_N, self.D, self.C
        shared, private = _shared_sample(idx_N, a, C, D)
        buf = self._buffers()
        z, norm_N1 = self._project(a, b, buf)
        dtype = np.dtype(self.plan.dtype)
        for t in range(a, b, self.tile):
            te = min(t + self.tile, b)
            n, lo = te - t, t - a
            sums = _RunSums(idx_N, t, te, self.out, shared, private, buf)
            for how, grp in self.groups.items():
                if how == "l2":
                    z_TD = np.divide(z["none"][lo:lo + n], norm_N1[lo:lo + n], out=buf.zl2[:n])
                else:
                    z_TD = z[how][lo:lo + n]
                G = len(grp.steps)
                args, vals = buf.args[:G, :n], buf.vals[:G, :n]
                for g, st in enumerate(grp.steps):
                    if st.source < 0:
                        np.multiply(z_TD, st.scale_D, out=args[g], casting="same_kind")
                    else:
                        np.multiply(args[grp.slot[st.source]], dtype.type(st.factor), out=args[g])
                for part, trig in ((0, np.cos), (1, np.sin)):
                    sums.add(trig(args, out=vals), grp.configs, part)
        return shared, private

    def _projection_buffers(self) -> dict[str, np.ndarray]:
        """One thread's (rows, D) float64 buffers, one per projection a block makes (l2 reuses ``none``)."""
        return {how: np.empty((self.rows, self.D)) for how in {"none" if h == "l2" else h for h in self.groups}}

    def _project(self, a: int, b: int, buf: SimpleNamespace) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        return _block_projections(self.x_Nd, a, b, self.target, self.U_dD, buf.z, "l2" in self.groups)


def _block_projections(x_Nd: np.ndarray, a: int, b: int, target: TargetPlan, U_dD: np.ndarray,
                       zbufs: dict[str, np.ndarray], l2: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The reference's float64 projections of rows [a, b) into ``zbufs`` (normalisation -> buffer), and
    the l2 row norms when ``l2``."""
    xb_Nd = np.asarray(x_Nd[a:b], np.float64)
    z = {how: np.matmul(normalise(xb_Nd, how, target), U_dD, out=zbuf[:b - a]) for how, zbuf in zbufs.items()}
    norm_N1 = None
    if l2:  # the reference's l2 projection, row by row: raw / max(|x|, 1e-30)
        norm_N1 = np.maximum(np.linalg.norm(xb_Nd, axis=1, keepdims=True), 1e-30)
    return z, norm_N1


@dataclass(frozen=True)
class _Group:
    """One normalisation's argument steps in stacking order; ``slot`` maps a config to its row of the
    stack, ``configs`` indexes the configs axis of the sums (a slice when they are contiguous)."""

    steps: list[_ArgStep]
    slot: dict[int, int]
    configs: slice | np.ndarray

    @staticmethod
    def of(steps: list[_ArgStep]) -> _Group:
        cs = [st.config for st in steps]
        contiguous = cs == list(range(cs[0], cs[0] + len(cs)))
        return _Group(steps, {c: g for g, c in enumerate(cs)},
                      slice(cs[0], cs[0] + len(cs)) if contiguous else np.array(cs))


class _RunSums:
    """Float64 column sums of the runs (one sample's rows) of a tile [t, te), added to ``out[sample]`` or
    to ``private`` for the block's shared sample: the values cast to float64 once, then one product per
    run (ones (1, rows) @ the run's values (G, rows, D); one run for most tiles), measured faster than
    numpy's casting reduction."""

    def __init__(self, idx_N: np.ndarray, t: int, te: int, out: np.ndarray, shared: int,
                 private: np.ndarray | None, buf: SimpleNamespace):
        self.buf = buf
        if idx_N[t] == idx_N[te - 1]:  # rows of a sample are contiguous: one run
            self.ind_RT = buf.ones_1T[:, :te - t]
            self.dest = [private if idx_N[t] == shared else out[idx_N[t]]]
            return
        starts = run_starts(idx_N[t:te])
        self.dest = [private if s == shared else out[s] for s in idx_N[t + starts].tolist()]
        self.bounds = list(zip(starts.tolist(), np.r_[starts[1:], te - t].tolist()))

    def add(self, vals_GTD: np.ndarray, configs: slice | np.ndarray, part: int) -> None:
        G, T, D = vals_GTD.shape
        vals64 = vals_GTD
        if vals_GTD.dtype != np.float64:
            vals64 = self.buf.vals64[:G, :T]
            np.copyto(vals64, vals_GTD)
        if len(self.dest) == 1:
            sums_GRD = np.matmul(self.ind_RT, vals64, out=self.buf.sums_G1D[:G])
            self.dest[0][configs, part] += sums_GRD[:, 0]
            return
        # several runs: each summed over its own rows (an indicator over the whole tile would multiply a
        # NaN of one sample's key by 0 and spread it to the tile's other samples; the reference does not)
        for (s0, s1), dest in zip(self.bounds, self.dest):
            dest[configs, part] += np.matmul(self.buf.ones_1T[:, :s1 - s0], vals64[:, s0:s1])[:, 0]


_KERNEL_TILE_VALUES = 2**15  # rows x D values of one tile of the kernel path (8 rows at D = 4096)


def _per_sample_rf_kernel(plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples,
                          lib=None) -> np.ndarray:
    """Per-sample cos/sin sums (S, C, 2, D) of every config with the compiled kernel (``rfkernel.c``, issue
    26; ``docs/scale.md``, "A compiled kernel"): :func:`_per_sample_rf_fast`'s blocks, threads and
    projections (:class:`_KernelWork`, a :class:`_FastWork`); per block and normalisation either one fused
    C call (arguments, numpy's own cos/sin loops and run sums, chunk by chunk of frequencies) or, in tiles
    mode, per tile one C call for the float32 arguments, numpy's ``cos``/``sin``, one C call for the float64
    run sums. The values are the numpy path's: the same argument bits, the same cos/sin bits, float64 sums in
    row order (only where a run is cut into chunks, tiles and blocks do partial sums add in another order,
    as in the numpy path). ``lib``: an :class:`~kscale.analysis.rfkernel.RFKernel`; None asks
    :func:`kscale.analysis.rfkernel.kernel` and runs the numpy path when there is none. float64 plans run
    the numpy path (the kernel is float32 only)."""
    lib = lib if lib is not None else _rf_kernel(plan)
    if lib is None or np.dtype(plan.dtype) != np.float32:
        return _per_sample_rf_fast(plan, target, x_Nd, smp)
    return _run_blocks(lambda *a: _KernelWork(*a, lib=lib), plan, target, x_Nd, smp)


@dataclass(frozen=True)
class _KernelGroup:
    """One normalisation's stack for ``kscale_rf_args``/``kscale_rf_sums``: base slots and their scales
    (B, D), derived slots (source slot, destination slot, float32 factor) and the config of every slot."""

    scale_BD: np.ndarray
    base_slot: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    factor: np.ndarray
    config: np.ndarray

    @staticmethod
    def of(grp: _Group) -> _KernelGroup:
        base = [(g, st) for g, st in enumerate(grp.steps) if st.source < 0]
        derived = [(g, st) for g, st in enumerate(grp.steps) if st.source >= 0]
        i64 = np.int64
        return _KernelGroup(np.ascontiguousarray(np.stack([st.scale_D for _, st in base]), np.float64),
                            np.array([g for g, _ in base], i64),
                            np.array([grp.slot[st.source] for _, st in derived], i64),
                            np.array([g for g, _ in derived], i64),
                            np.array([st.factor for _, st in derived], np.float32),
                            np.array([st.config for st in grp.steps], i64))


class _KernelWork(_FastWork):
    """The work of :func:`_per_sample_rf_kernel` on one block of rows: :class:`_FastWork`'s projections,
    then, fused, one ``kscale_rf_block`` call per normalisation, or, in tiles mode, per tile and
    normalisation one ``kscale_rf_args`` call, numpy's ``cos`` and ``sin`` of the stack and one
    ``kscale_rf_sums`` call; sums go into ``out`` (or the block's private row of its shared sample)."""

    def __init__(self, plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, idx_N: np.ndarray,
                 out: np.ndarray, lib):
        super().__init__(plan, target, x_Nd, idx_N, out)
        self.lib = lib
        self.kgroups = {how: _KernelGroup.of(grp) for how, grp in self.groups.items()}
        self.tile = max(1, min(_TILE_ROWS, _KERNEL_TILE_VALUES // self.D))
        self.row_bytes = self.C * 2 * self.D * 8  # one sample's (C, 2, D) float64 sums

    def _buffers(self) -> SimpleNamespace:
        buf = getattr(self.local, "kbuf", None)
        if buf is None:
            G = max(len(g.steps) for g in self.groups.values())
            size = 0 if self.lib.loops is not None else G * self.tile * self.D  # tiles mode only
            buf = SimpleNamespace(z=self._projection_buffers(),
                                  args=np.empty(size, np.float32), cos=np.empty(size, np.float32),
                                  sin=np.empty(size, np.float32), bounds=np.empty(self.tile + 1, np.int64),
                                  dests=np.empty(self.tile, np.uint64))
            self.local.kbuf = buf
        return buf

    def run(self, a: int, b: int) -> tuple[int, np.ndarray | None]:
        """Add the sums of rows [a, b) into ``out``; returns (sample, row) of the sample shared with the
        rows before ``a`` (row None when there is none), which the caller adds after every block is done."""
        if self.lib.loops is not None:
            return self._run_fused(a, b)
        idx_N, D, lib = self.idx_N, self.D, self.lib
        shared, private = _shared_sample(idx_N, a, self.C, D)
        buf = self._buffers()
        z, norm_N1 = self._project(a, b, buf)
        out_p, private_p = self.out.ctypes.data, None if private is None else private.ctypes.data
        bounds_p, dests_p = buf.bounds.ctypes.data, buf.dests.ctypes.data
        ptrs = {how: (z["none" if how == "l2" else how].ctypes.data, kg, len(kg.config), kg.scale_BD.ctypes.data,
                      kg.base_slot.ctypes.data, len(kg.base_slot), kg.src.ctypes.data, kg.dst.ctypes.data,
                      kg.factor.ctypes.data, len(kg.src), kg.config.ctypes.data)
                for how, kg in self.kgroups.items()}
        norm = None if norm_N1 is None else np.ascontiguousarray(norm_N1)  # held: C reads it below
        norm_p = None if norm is None else norm.ctypes.data
        args_p, cos_p, sin_p = buf.args.ctypes.data, buf.cos.ctypes.data, buf.sin.ctypes.data
        for t in range(a, b, self.tile):
            te = min(t + self.tile, b)
            n, lo = te - t, t - a
            R = self._runs(t, te, shared, out_p, private_p, buf)
            for how, (z_p, kg, G, scale_p, base_p, B, src_p, dst_p, fac_p, ND, config_p) in ptrs.items():
                lib.args(z_p + lo * D * 8, None if how != "l2" else norm_p + lo * 8, n, D, scale_p, base_p, B,
                         src_p, dst_p, fac_p, ND, args_p)
                args = buf.args[:G * n * D].reshape(G, n, D)
                np.cos(args, out=buf.cos[:G * n * D].reshape(G, n, D))
                np.sin(args, out=buf.sin[:G * n * D].reshape(G, n, D))
                lib.sums(cos_p, sin_p, G, n, D, bounds_p, R, dests_p, config_p)
        return shared, private

    def _run_fused(self, a: int, b: int) -> tuple[int, np.ndarray | None]:
        """The fused pass (``kscale_rf_block``: cos/sin on chunks of a row that stay in cache, by
        ``kscale_rf_sincos`` (numpy's bits, one range reduction for both) or numpy's own loops called from C,
        ``lib.trig_kind``): one call per normalisation for the whole block, its runs and their destinations."""
        idx_N, D, lib = self.idx_N, self.D, self.lib
        shared, private = _shared_sample(idx_N, a, self.C, D)
        z, norm_N1 = self._project(a, b, self._buffers())
        starts = run_starts(idx_N[a:b])
        bounds = np.append(starts, b - a).astype(np.int64)
        out_p, private_p = self.out.ctypes.data, None if private is None else private.ctypes.data
        dests = np.array([private_p if s == shared else out_p + s * self.row_bytes
                          for s in idx_N[a + starts].tolist()], np.uint64)
        norm = None if norm_N1 is None else np.ascontiguousarray(norm_N1)  # held: C reads it below
        for how, kg in self.kgroups.items():
            z_p = z["none" if how == "l2" else how].ctypes.data
            if lib.block(z_p, None if how != "l2" else norm.ctypes.data, D, kg.scale_BD.ctypes.data,
                         kg.base_slot.ctypes.data, len(kg.base_slot), kg.src.ctypes.data, kg.dst.ctypes.data,
                         kg.factor.ctypes.data, len(kg.src), len(kg.config), b - a, bounds.ctypes.data, len(starts),
                         dests.ctypes.data, kg.config.ctypes.data, *lib.loops, lib.trig_flag) != 0:
                raise MemoryError("kscale_rf_block: out of memory")
        return shared, private

    def _runs(self, t: int, te: int, shared: int, out_p: int, private_p: int | None, buf: SimpleNamespace) -> int:
        """The runs of tile [t, te) into ``buf.bounds`` (R + 1 row bounds) and ``buf.dests`` (R pointers to
        the sample's (C, 2, D) sums: ``out[sample]``, or the private row of the shared sample); returns R."""
        idx_N = self.idx_N
        first, last = int(idx_N[t]), int(idx_N[te - 1])
        if first == last:
            buf.bounds[0], buf.bounds[1] = 0, te - t
            buf.dests[0] = private_p if first == shared else out_p + first * self.row_bytes
            return 1
        starts = run_starts(idx_N[t:te])
        R = len(starts)
        buf.bounds[:R] = starts
        buf.bounds[R] = te - t
        for r, s in enumerate(idx_N[t + starts].tolist()):
            buf.dests[r] = private_p if s == shared else out_p + s * self.row_bytes
        return R


_STACK_TILE_ROWS = 2  # rows of one tile of the stacked path
_STACK_CHUNK = 4096  # frequencies of one chunk (1024 keeps a tile's arguments, values and accumulator in a core's L2)


def _per_sample_rf_stacked(plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples,
                           ) -> np.ndarray:
    """Per-sample cos/sin sums (S, C, 2, D) of every config, the values of :func:`_per_sample_rf_reference`
    to float64 rounding (the float32 arguments and cos/sin values are the same bits; only the order of the
    float64 sums differs): a second layout of :func:`_per_sample_rf_fast`'s work (issue 26), kept for
    ``bench/rf_throughput.py`` (backend ``stacked``) and its tests. Measured under load it is no faster
    than the fast path on one thread and slower on two (``docs/scale.md``, "Random features at the CPU's
    limit"), so the analysis does not run it.

    Rows are cut into blocks as in :func:`_per_sample_rf_fast` (same projections, same threads, same
    private row for a sample that started in an earlier block). A block then walks chunks of
    ``_STACK_CHUNK`` frequencies and, inside a chunk, tiles of ``_STACK_TILE_ROWS`` rows; every config's
    argument of a tile is one slot of a (rows, C, chunk) stack (:class:`_Stack`): one broadcast float64
    product (per normalisation when they have different numbers of bases) and one cast to the dtype make
    the base arguments, one broadcast multiply the power-of-two multiples (or one per run of equal
    factors), one cos and one sin the whole stack's values, and each row's cos/sin values are added into
    the current sample's float64 accumulator in one call (numpy casts in an L1-sized buffer). The
    accumulator, (2, C, chunk), is added into ``out`` when the sample ends. The stack keeps the numpy calls
    per key few; a chunk of 1024 would keep a thread's buffers in its core's L2 (measured no faster).
    """
    return _run_blocks(_StackWork, plan, target, x_Nd, smp)


@dataclass(frozen=True)
class _Stack:
    """Where each config's argument lies in the stack of a tile: ``configs[slot]`` is the config of a slot.

    Slots [0, n_base) are base arguments, grouped per normalisation (``bases``: normalisation, slot range,
    scales (k, D)); the other slots are exact power-of-two multiples of a base, ordered by factor and
    source slot so that one multiply serves every run of them (``derived``: destination range, source
    slots (a slice: an arithmetic progression), factor)."""

    configs: np.ndarray
    bases: list[tuple[str, int, int, np.ndarray]]
    derived: list[tuple[int, int, slice, float]]
    n_base: int
    scale_HkD: np.ndarray | None  # the bases' scales (normalisation, k, D) when each has k bases, else None
    fused: tuple[int, int, slice, np.ndarray] | None  # every derived step as one broadcast multiply, or None

    @staticmethod
    def of(plan: ChunkPlan, target: TargetPlan) -> _Stack:
        steps = _arg_steps(plan, target)
        order: list[int] = []
        slot: dict[int, int] = {}
        bases = []
        for how, group in steps.items():
            lo = len(order)
            for st in group:
                if st.source < 0:
                    slot[st.config] = len(order)
                    order.append(st.config)
            bases.append((how, lo, len(order), np.stack([st.scale_D for st in group if st.source < 0])))
        n_base = len(order)
        rest = sorted((st for group in steps.values() for st in group if st.source >= 0),
                      key=lambda st: (st.factor, slot[st.source]))
        derived: list[tuple[int, int, slice, float]] = []
        for st in rest:
            dst, src = len(order), slot[st.source]
            slot[st.config] = dst
            order.append(st.config)
            if derived and derived[-1][3] == st.factor and _extends(derived[-1][2], src):
                d0, _, srcs, f = derived[-1]
                step = src - srcs.start if srcs.stop - srcs.start == 1 else srcs.step
                derived[-1] = (d0, dst + 1, slice(srcs.start, src + 1, step), f)
            else:
                derived.append((dst, dst + 1, slice(src, src + 1, 1), st.factor))
        ks = {s1 - s0 for _, s0, s1, _ in bases}
        scale_HkD = np.stack([sc for *_, sc in bases]) if len(ks) == 1 else None
        return _Stack(np.array(order), bases, derived, n_base, scale_HkD, _fused(derived))


def _fused(derived: list[tuple[int, int, slice, float]]) -> tuple[int, int, slice, np.ndarray] | None:
    """(first slot, last slot + 1, sources, factors (F, 1, 1)) when the derived steps are F runs over the
    same source slots that follow each other (the default 0.5, 1, 2: x2 and x4 of every base), else None."""
    if len(derived) < 2 or any(d[2] != derived[0][2] or d[0] != derived[0][0] + i * (derived[0][1] - derived[0][0])
                               or d[1] - d[0] != derived[0][1] - derived[0][0] for i, d in enumerate(derived)):
        return None
    return derived[0][0], derived[-1][1], derived[0][2], np.array([d[3] for d in derived])[:, None, None]


def _extends(srcs: slice, src: int) -> bool:
    """Whether source slot ``src`` continues the arithmetic progression of the slots ``srcs``."""
    if srcs.stop - srcs.start == 1:
        return src > srcs.start
    return src == srcs.stop - 1 + srcs.step


class _StackWork:
    """The work of :func:`_per_sample_rf_stacked` on one block of rows; buffers are per thread and reused."""

    def __init__(self, plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, idx_N: np.ndarray,
                 out: np.ndarray):
        self.plan, self.target, self.x_Nd, self.idx_N, self.out = plan, target, x_Nd, idx_N, out
        self.stack = _Stack.of(plan, target)
        self.factors_F11 = None if self.stack.fused is None else self.stack.fused[3].astype(plan.dtype)
        self.U_dD = plan.freqs.directions_Dd.T
        self.D, self.C = self.U_dD.shape[1], len(plan.configs)
        self.dtype = np.dtype(plan.dtype)
        self.chunk = max(1, min(self.D, _STACK_CHUNK))
        self.tile = max(1, _STACK_TILE_ROWS)
        self.rows = max((b - a for a, b in _fast_blocks(len(x_Nd), _batch_rows(plan), _BLOCK_ROWS)), default=0)
        self.local = threading.local()

    def _buffers(self) -> SimpleNamespace:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            T, W, C, dt = self.tile, self.chunk, self.C, self.dtype
            buf = SimpleNamespace(z=np.empty((self.rows, len(self.stack.bases), self.D)),
                                  base=np.empty(T * self.stack.n_base * W),
                                  args=np.empty(T * C * W, dt), vals=np.empty(T * 2 * C * W, dt),
                                  acc=np.empty(2 * C * W))
            self.local.buf = buf
        return buf

    def run(self, a: int, b: int) -> tuple[int, np.ndarray | None]:
        """Add the sums of rows [a, b) into ``out``; returns (sample, row) of the sample shared with the
        rows before ``a`` (row None when there is none), which the caller adds after every block is done."""
        idx_N, D, C = self.idx_N, self.D, self.C
        shared, private = _shared_sample(idx_N, a, C, D)
        buf = self._buffers()
        z = self._project(a, b, buf)
        samples = idx_N[a:b].tolist()
        for c0 in range(0, D, self.chunk):
            c1 = min(c0 + self.chunk, D)
            acc = buf.acc[:2 * C * (c1 - c0)].reshape(2, C, c1 - c0)
            acc[...] = 0.0
            current = samples[0]
            for t in range(a, b, self.tile):
                vals = self._tile(z, t - a, min(t + self.tile, b) - a, c0, c1, buf)
                current = self._sum_rows(vals, samples[t - a:t - a + len(vals)], current, acc, c0, c1,
                                         shared, private)
            self._flush(current, acc, c0, c1, shared, private)
        return shared, private

    def _project(self, a: int, b: int, buf: SimpleNamespace) -> np.ndarray:
        """The reference's float64 projections of rows [a, b), (rows, normalisation, D) in the stack's
        order of normalisations: ``X U^T`` per normalisation (numpy's BLAS writes the strided rows with the
        bits of a contiguous product), l2 as the raw one / max(|x|, 1e-30), as the reference."""
        xb_Nd = np.asarray(self.x_Nd[a:b], np.float64)
        z = buf.z[:b - a]
        hows = [how for how, *_ in self.stack.bases]
        for h, how in enumerate(hows):
            if how != "l2":
                np.matmul(normalise(xb_Nd, how, self.target), self.U_dD, out=z[:, h])
        if "l2" in hows:
            h = hows.index("l2")
            raw = z[:, hows.index("none")] if "none" in hows else np.matmul(xb_Nd, self.U_dD, out=z[:, h])
            np.divide(raw, np.maximum(np.linalg.norm(xb_Nd, axis=1, keepdims=True), 1e-30), out=z[:, h])
        return z

    def _tile(self, z: np.ndarray, lo: int, hi: int, c0: int, c1: int, buf: SimpleNamespace) -> np.ndarray:
        """cos/sin values (rows, 2, C, chunk) of rows [lo, hi) of the block, frequencies [c0, c1)."""
        n, w, C, st = hi - lo, c1 - c0, self.C, self.stack
        base = buf.base[:n * st.n_base * w].reshape(n, st.n_base, w)
        if st.scale_HkD is not None:  # every normalisation has k bases: one product
            H, k = st.scale_HkD.shape[:2]
            np.multiply(z[lo:hi, :, None, c0:c1], st.scale_HkD[None, :, :, c0:c1], out=base.reshape(n, H, k, w))
        else:
            for h, (_, s0, s1, scale_kD) in enumerate(st.bases):
                np.multiply(z[lo:hi, h, None, c0:c1], scale_kD[None, :, c0:c1], out=base[:, s0:s1])
        args = buf.args[:n * C * w].reshape(n, C, w)
        np.copyto(args[:, :st.n_base], base, casting="same_kind")
        if st.fused is not None:
            d0, d1, srcs, f_F11 = st.fused
            np.multiply(args[:, None, srcs], self.factors_F11, out=args[:, d0:d1].reshape(n, len(f_F11), -1, w))
        else:
            for d0, d1, srcs, f in st.derived:
                np.multiply(args[:, srcs], self.dtype.type(f), out=args[:, d0:d1])
        vals = buf.vals[:n * 2 * C * w].reshape(n, 2, C, w)
        np.cos(args, out=vals[:, 0])
        np.sin(args, out=vals[:, 1])
        return vals

    def _sum_rows(self, vals: np.ndarray, samples: list[int], current: int, acc: np.ndarray, c0: int, c1: int,
                  shared: int, private: np.ndarray | None) -> int:
        """Add each row's values into the accumulator of its sample (flushing at sample changes)."""
        for r, s in enumerate(samples):
            if s != current:
                self._flush(current, acc, c0, c1, shared, private)
                acc[...] = 0.0
                current = s
            np.add(acc, vals[r], out=acc)
        return current

    def _flush(self, sample: int, acc: np.ndarray, c0: int, c1: int, shared: int,
               private: np.ndarray | None) -> None:
        dest = private if sample == shared else self.out[sample]
        dest[self.stack.configs, :, c0:c1] += acc.transpose(1, 0, 2)


def _runs(idx_N: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal ``idx_N`` values."""
    starts = run_starts(idx_N)
    return list(zip(starts.tolist(), np.r_[starts[1:], len(idx_N)].tolist()))


def _add_runs(out_SD: np.ndarray, vals_ND: np.ndarray, idx_N: np.ndarray, runs: list[tuple[int, int]]) -> None:
    """out[idx of run] += float64 column sums of each run, rows added in order (as ``np.add.reduceat``;
    a plain sum per run avoids reduceat's slow casting loop)."""
    tmp_D = np.empty(vals_ND.shape[1])
    for lo, hi in runs:
        np.sum(vals_ND[lo:hi], axis=0, dtype=np.float64, out=tmp_D)
        out_SD[idx_N[lo]] += tmp_D


def _projection(x_Nd: np.ndarray, how: str, target: TargetPlan, freqs: Frequencies,
                cache: dict[str, np.ndarray]) -> np.ndarray:
    if how not in cache:
        if how == "l2":  # rows rescale: reuse X U^T
            raw = _projection(x_Nd, "none", target, freqs, cache)
            cache[how] = raw / np.maximum(np.linalg.norm(x_Nd, axis=1, keepdims=True), 1e-30)
        else:
            cache[how] = normalise(x_Nd, how, target) @ freqs.directions_Dd.T
    return cache[how]


def _per_sample_linear(plan: ChunkPlan, target: TargetPlan, x_Nd: np.ndarray, smp: BlockSamples,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample key sums (S, M, d) and squared norms (S, M) per normalisation (linear kernel)."""
    M, S, d = len(plan.normalisations), len(smp.ids_S), x_Nd.shape[1]
    lin_SMd, sq_SM = np.zeros((S, M, d)), np.zeros((S, M))
    if not M:
        return lin_SMd, sq_SM
    x_Nd = np.asarray(x_Nd, np.float64)
    starts = run_starts(smp.index_N)
    for m, how in enumerate(plan.normalisations):
        xn_Nd = normalise(x_Nd, how, target)
        lin_SMd[:, m] = np.add.reduceat(xn_Nd, starts, axis=0)
        sq_SM[:, m] = np.add.reduceat(np.einsum("nd,nd->n", xn_Nd, xn_Nd), starts)
    return lin_SMd, sq_SM


def _hist_counts(target: TargetPlan, x_Nd: np.ndarray, bucket_N: np.ndarray, K: int) -> np.ndarray:
    """Counts (K, P, B) of the histogram columns ``x @ proj`` in their shared quantile bins.

    A value equal to an interior edge goes to the bin above it (``searchsorted(side="right")``)."""
    vals_NP = np.asarray(x_Nd, np.float64) @ target.proj_dP
    P, B = target.proj_dP.shape[1], target.edges_PB.shape[1] + 1
    bins_NP = np.empty(vals_NP.shape, np.int64)
    for p in range(P):
        bins_NP[:, p] = np.searchsorted(target.edges_PB[p], vals_NP[:, p], side="right")
    flat_NP = (bucket_N[:, None] * P + np.arange(P)) * B + bins_NP
    return np.bincount(flat_NP.ravel(), minlength=K * P * B).reshape(K, P, B).astype(np.float64)


def _target_rows(block_NHd: np.ndarray, sample_ids_N: np.ndarray, target: TargetPlan,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of one target in sample order (stored dtype): a head's column, or the heads stacked per token."""
    if len(target.heads) == 1:
        return block_NHd[:, target.heads[0]], sample_ids_N
    x_NHd = block_NHd[:, target.heads]
    return x_NHd.reshape(-1, x_NHd.shape[-1]), np.repeat(sample_ids_N, len(target.heads))


@dataclass(frozen=True)
class _SideBlock:
    """One modality of one target in one block: its sums and the per-sample sums the cross terms need."""

    sums: Sums
    ids_S: np.ndarray
    count_S: np.ndarray
    rf_SC2D: np.ndarray | None
    lin_SMd: np.ndarray


def side_block(plan: ChunkPlan, target: TargetPlan, block_NHd: np.ndarray, sample_ids_N: np.ndarray,
               ) -> _SideBlock:
    """Sums of one target over one modality's rows of a block (whole samples, sorted by id)."""
    x_Nd, sid_N = _target_rows(block_NHd, sample_ids_N, target)
    acc = empty_sums(plan, target, x_Nd.shape[1])
    smp = BlockSamples.of(sid_N)
    bucket_S = plan.buckets.of(smp.ids_S)
    count_S = smp.count_S.astype(np.float64)
    _bucket_add(acc.count_K, bucket_S, count_S)
    _bucket_add(acc.samples_K, bucket_S, np.ones(len(count_S)))
    _bucket_add(acc.nsq_K, bucket_S, count_S**2)
    rf_SC2D = None
    if plan.freqs is not None and plan.configs:
        rf_SC2D = _per_sample_rf(plan, target, x_Nd, smp)
        _bucket_add(acc.rf_KC2D, bucket_S, rf_SC2D)
        _bucket_add(acc.rfself_KCD, bucket_S, (rf_SC2D**2).sum(2))
        if len(smp.ids_S) <= plan.max_units:
            acc.unit_ids.append(smp.ids_S)
            acc.unit_rf.append(rf_SC2D[:, 0].copy())  # a copy: a view would keep every config's sums alive
            acc.unit_count.append(count_S)
        else:
            acc.units_dropped = True
    lin_SMd, sq_SM = _per_sample_linear(plan, target, x_Nd, smp)
    _bucket_add(acc.lin_KMd, bucket_S, lin_SMd)
    _bucket_add(acc.linsq_KM, bucket_S, sq_SM)
    _bucket_add(acc.linself_KM, bucket_S, (lin_SMd**2).sum(-1))
    if target.proj_dP is not None:
        acc.hist_KPB += _hist_counts(target, x_Nd, bucket_S[smp.index_N], plan.n_buckets)
    return _SideBlock(acc, smp.ids_S, count_S, rf_SC2D, lin_SMd)


def _cross_terms(plan: ChunkPlan, sx: _SideBlock, sy: _SideBlock, out: TargetSums) -> None:
    """Within-sample cross-modal terms of the samples present in both modalities of the block."""
    common, ix, iy = np.intersect1d(sx.ids_S, sy.ids_S, assume_unique=True, return_indices=True)
    bucket = plan.buckets.of(common)
    _bucket_add(out.ncross_K, bucket, sx.count_S[ix] * sy.count_S[iy])
    _bucket_add(out.lincross_KM, bucket, (sx.lin_SMd[ix] * sy.lin_SMd[iy]).sum(-1))
    if sx.rf_SC2D is not None:
        _bucket_add(out.rfcross_KCD, bucket, (sx.rf_SC2D[ix] * sy.rf_SC2D[iy]).sum(2))
    union = np.union1d(sx.ids_S, sy.ids_S)
    _bucket_add(out.union_K, plan.buckets.of(union), np.ones(len(union)))


def empty_target_sums(plan: ChunkPlan, target: TargetPlan, d: int, mods: list[str]) -> TargetSums:
    K, C, M = plan.n_buckets, len(plan.configs), len(plan.normalisations)
    D = plan.freqs.directions_Dd.shape[0] if plan.freqs is not None else 0
    return TargetSums({m: empty_sums(plan, target, d) for m in mods}, np.zeros((K, C, D)), np.zeros((K, M)),
                      np.zeros(K), np.zeros(K))


def chunk_sums(item: dict[str, tuple[np.ndarray, np.ndarray] | None], plan: ChunkPlan,
               ) -> dict[int, TargetSums]:
    """TargetSums of every target of ``plan`` over one joint block (the unit of streamed work).

    ``item`` maps modality -> (keys (N, H, d), sample ids (N,)) or None; exactly two modalities, the
    first is x and the second y of the cross comparison."""
    mods = list(item)
    present = {m: v for m, v in item.items() if v is not None}
    d = next(iter(present.values()))[0].shape[-1]
    out: dict[int, TargetSums] = {}
    for tid, target in plan.targets.items():
        acc = empty_target_sums(plan, target, d, mods)
        sides = {m: side_block(plan, target, blk, np.asarray(ids)) for m, (blk, ids) in present.items()}
        for m, sb in sides.items():
            acc.by_mod[m] = sb.sums
        if len(sides) == 2:
            _cross_terms(plan, sides[mods[0]], sides[mods[1]], acc)
        else:
            only = next(iter(sides.values()))
            _bucket_add(acc.union_K, plan.buckets.of(only.ids_S), np.ones(len(only.ids_S)))
        out[tid] = acc
    return out


def merger(max_units: int):
    """The reduce step of :func:`chunk_sums` results (a module-level class: picklable for dask)."""
    return _Merge(max_units)


@dataclass(frozen=True)
class _Merge:
    max_units: int

    def __call__(self, a: dict[int, TargetSums], b: dict[int, TargetSums]) -> dict[int, TargetSums]:
        return {k: a[k].merge(b[k], self.max_units) for k in a}


def single_target_plan(d: int, *, n_features: int, bandwidth: float, sample_ids: np.ndarray,
                       kernels: tuple[str, ...] = ("rbf",), multiples: tuple[float, ...] = (1.0,),
                       orthogonal: bool = True, seed: int = 0, n_buckets: int = 1,
                       max_units: int = 0, dtype: str = "float32", batch_rows: int = 2048,
                       backend: str = "numpy") -> ChunkPlan:
    """A plan for plain (N, d) arrays — one target, no normalisation; used by the benchmark and tests.

    Buckets are assigned round-robin over the sorted unique ``sample_ids``.
    """
    ids = np.unique(sample_ids)
    target = TargetPlan(heads=[0], bandwidth={"none": bandwidth}, centre_d=np.zeros(d), scale_d=np.ones(d))
    configs = [FeatureConfig("none", k, m) for k in kernels for m in multiples]
    return ChunkPlan(draw_frequencies(d, n_features, orthogonal=orthogonal, seed=seed), configs, [],
                     {0: target}, TableBuckets(ids, np.arange(len(ids)) % n_buckets, n_buckets), dtype,
                     batch_rows, max_units, backend)


def plain_sums(x_Nd: np.ndarray, sample_ids_N: np.ndarray, plan: ChunkPlan) -> Sums:
    """Sums of plain (N, d) rows of one modality for a single-target plan (tests, benchmark)."""
    return side_block(plan, plan.targets[0], x_Nd[:, None, :], sample_ids_N).sums
