"""From a layer's recorded subsample to the plans that drive the streaming pass.

Per layer, a seeded subsample of tokens of each modality is read into memory once. From it come,
per target (a head, or heads pooled): the :class:`Scales` (median-heuristic bandwidth of every
normalisation, standardisation centre/scale; modalities weighted equally) chosen by
``mmd.bandwidth_policy`` — the target's own pool, the layer's pooled heads, fixed values, or a reference
store's pool — and the histogram columns with their shared quantile bins. The same subsample later
feeds the exact MMD, the paper mode and the pictures. Every random choice is seeded by
``analyze.seed``.

Comparisons are defined here too: which modality and which half of the sample buckets is X and Y,
and which buckets form the two folds of cross-MMD.

Shapes: n subsample tokens, H heads, d head dim, P histogram columns, B bins, K buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kscale.spec.analyze import AnalyzeConfig
from kscale.analysis.features import TargetPlan, normalise
from kscale.analysis.jsd import lda_direction, pca_directions, quantile_edges, random_directions
from kscale.analysis.mmd import median_bandwidth

POOLED = -1


@dataclass(frozen=True)
class Comparison:
    """X and Y of one comparison; ``half`` None means all buckets, 0/1 the bucket parity."""

    name: str
    mod_x: str
    mod_y: str
    half_x: int | None
    half_y: int | None

    def mask(self, side: str, bucket_K: np.ndarray) -> np.ndarray:
        half = self.half_x if side == "x" else self.half_y
        return np.ones(len(bucket_K), bool) if half is None else bucket_K % 2 == half

    def fold(self, bucket_K: np.ndarray) -> np.ndarray:
        """Cross-MMD folds: bucket parity for cross, the next bit for intra (parity is the side)."""
        return bucket_K % 2 if self.half_x is None else (bucket_K // 2) % 2


def pair_comparison(x: str, y: str) -> Comparison:
    """The one comparison of a modality-pair run (``x_vs_y``: all samples of x against all of y), e.g.
    ``video_vs_image`` where a store has video tokens (:func:`kscale.analysis.run.modality_pairs`)."""
    return Comparison(f"{x}_vs_{y}", x, y, None, None)


def comparisons(names: list[str], image_mod: str) -> list[Comparison]:
    table = {
        "cross": Comparison("cross", image_mod, "text", None, None),
        "intra_text": Comparison("intra_text", "text", "text", 0, 1),
        "intra_image": Comparison("intra_image", image_mod, image_mod, 0, 1),
    }
    return [table[n] for n in names]


@dataclass
class Subsample:
    """Subsampled keys of one layer: rows (n, H, d), their sample ids and buckets, per modality."""

    keys: dict[str, np.ndarray]
    sample_ids: dict[str, np.ndarray]
    buckets: dict[str, np.ndarray]

    def target(self, mod: str, heads: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors, sample ids, buckets) of a target; pooled heads stack as extra rows per token."""
        x_nHd = self.keys[mod][:, heads]
        rep = len(heads)
        return (x_nHd.reshape(-1, x_nHd.shape[-1]), np.repeat(self.sample_ids[mod], rep),
                np.repeat(self.buckets[mod], rep))

    def side(self, comp: Comparison, side: str, heads: list[int], limit: int, seed: int,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``limit`` vectors (sample ids, buckets) of one side of a comparison, in random order."""
        mod = comp.mod_x if side == "x" else comp.mod_y
        x, sid, bucket = self.target(mod, heads)
        keep = comp.mask(side, bucket)
        if len(heads) > 1:  # stacked heads are ordered by token: shuffle before truncating
            order = np.random.default_rng([seed, 0x5DE, len(x)]).permutation(len(x))
            x, sid, bucket, keep = x[order], sid[order], bucket[order], keep[order]
        return x[keep][:limit], sid[keep][:limit], bucket[keep][:limit]


def balanced_pool(sub: Subsample, heads: list[int], image_mod: str, k: int, seed: int,
                  other: str = "text") -> np.ndarray:
    """Equal numbers (<= k) of image (video) and text vectors of a target (``other``: the second modality of
    a pair run), for scale-setting statistics."""
    a, _, _ = sub.target(image_mod, heads)
    b, _, _ = sub.target(other, heads)
    rng = np.random.default_rng([seed, 0xBA1])
    n = min(k, len(a), len(b))
    return np.vstack([a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]])


@dataclass(frozen=True)
class Scales:
    """Median bandwidth per normalisation and the standardisation centre/scale (d,), with their origin."""

    bandwidth: dict[str, float]
    centre_d: np.ndarray
    scale_d: np.ndarray
    policy: str


def pool_scales(pool_nd: np.ndarray, norms: list[str], seed: int, policy: str) -> Scales:
    """Scales from a balanced pool: standardise with its mean/SD, median heuristic per normalisation."""
    centre_d, scale_d = pool_nd.mean(0), np.maximum(pool_nd.std(0), 1e-12)
    probe = TargetPlan(heads=[0], bandwidth={}, centre_d=centre_d, scale_d=scale_d)
    bw = {how: median_bandwidth(normalise(pool_nd, how, probe), seed=seed) for how in norms}
    return Scales(bw, centre_d, scale_d, policy)


def histogram_columns(cfg: AnalyzeConfig, sub: Subsample, heads: list[int], pool_nd: np.ndarray,
                      comps: list[Comparison], seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Projection (d, P) onto every histogram column and the column indices of each family.

    Families: ``marginal`` (identity), ``random``, ``pca``, and ``lda:<comparison>`` (Fisher direction
    fitted on the subsample's two sides of that comparison).
    """
    d = pool_nd.shape[1]
    blocks, families, start = [], {}, 0

    def add(name: str, proj_dk: np.ndarray) -> None:
        nonlocal start
        blocks.append(proj_dk)
        families[name] = np.arange(start, start + proj_dk.shape[1])
        start += proj_dk.shape[1]

    kinds = cfg.jsd.histogram
    if "marginal" in kinds:
        add("marginal", np.eye(d))
    if "random" in kinds and cfg.jsd.n_random:
        add("random", random_directions(d, cfg.jsd.n_random, seed))
    if "pca" in kinds and cfg.jsd.n_pca:
        add("pca", pca_directions(pool_nd, min(cfg.jsd.n_pca, d)))
    if "lda" in kinds:
        for comp in comps:
            x, _, _ = sub.side(comp, "x", heads, 10**9, seed)
            y, _, _ = sub.side(comp, "y", heads, 10**9, seed)
            if len(x) > 2 and len(y) > 2:
                add(f"lda:{comp.name}", lda_direction(x, y)[:, None])
    return np.hstack(blocks), families


def _pair(sub: Subsample) -> tuple[str, str]:
    """The two modalities a subsample holds, in the run's order (visual side first, then text or image)."""
    x, y = sub.keys
    return x, y


def target_plan(cfg: AnalyzeConfig, sub: Subsample, heads: list[int], comps: list[Comparison],
                norms: list[str], with_hist: bool, shared: Scales | None,
                ) -> tuple[TargetPlan, dict[str, np.ndarray]]:
    """Bandwidths, standardisation (``shared``, or the target's own pool) and histogram bins of a target."""
    x, y = _pair(sub)
    pool_nd = balanced_pool(sub, heads, x, cfg.mmd.median_subsample, cfg.seed, other=y)
    scales = shared if shared is not None else pool_scales(pool_nd, norms, cfg.seed, "per_target")
    plan = TargetPlan(heads=list(range(len(heads))), bandwidth=dict(scales.bandwidth),
                      centre_d=scales.centre_d, scale_d=scales.scale_d)
    families: dict[str, np.ndarray] = {}
    if with_hist:
        proj_dP, families = histogram_columns(cfg, sub, heads, pool_nd, comps, cfg.seed)
        plan.proj_dP = proj_dP
        plan.edges_PB = quantile_edges(pool_nd @ proj_dP, cfg.jsd.bins)
    return plan, families


def layer_scales(cfg: AnalyzeConfig, sub: Subsample, heads: list[int], norms: list[str],
                 reference: Subsample | None) -> Scales | None:
    """The layer-wide Scales of policies per_layer / fixed / reference; None for per_target."""
    policy = cfg.mmd.bandwidth_policy
    if policy == "per_target":
        return None
    source = reference if policy == "reference" else sub
    x, y = _pair(source)
    pool_nd = balanced_pool(source, list(range(len(heads))), x, cfg.mmd.median_subsample, cfg.seed, other=y)
    scales = pool_scales(pool_nd, norms, cfg.seed, policy)
    if policy == "fixed":
        return Scales({h: float(cfg.mmd.bandwidths[h]) for h in norms}, scales.centre_d, scales.scale_d, policy)
    return scales
