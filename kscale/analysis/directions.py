"""Where the gap lives: the image/text mean difference along the principal directions of the pooled keys.

Per layer and target (a KV head, or the heads pooled as extra vectors like the MMD's pooled target), the
MMD's streaming pass over the layer's joint blocks (``run.layer_items``; :func:`direction_sums` rides along
``features.chunk_sums`` in one task per block: ``stream.Runner.map_reduce_fused``) also sums,
per modality, the count n, the vector sum s_d and the second-moment matrix S_dd of the keys shifted by a
fixed centre c (the standardisation centre of the layer's subsample: it only keeps S - n mu mu^T free of
cancellation). :class:`DirectionSums` merge by addition, so blocks, threads and dask workers reduce
exactly; memory is O(d^2) per target, never O(tokens).

At the end, once per layer and target (:func:`direction_rows`): the pooled covariance C of both modalities
together (the keys a PCA of the layer would see, each token weighted once) is eigendecomposed, C = U L U^T
with eigenvalues in descending order, and the mean difference delta = mu_image - mu_text is projected on
each principal direction u_j. Since sum_j (u_j . delta)^2 = |delta|^2, the squared projections split the
squared mean difference exactly; |delta|^2 is also the linear-kernel MMD^2 (biased V-statistic,
token-level), so the same shares are the linear MMD^2's. ``n50`` / ``n90`` are the fewest leading
directions whose cumulative share reaches 50% / 90%.

The mean difference sees only first moments; the **RF MMD^2 along a direction** sees the whole 1-d
distribution of the two modalities' projections ``z = u_j . x``. Once the directions are known, a second
streaming pass (:func:`direction_mmd_sums`, mergeable like the first) sums per target, modality and leading
direction (the first :data:`MMD_DIRECTIONS`) the random Fourier features ``cos(w_f z), sin(w_f z)`` of a 1-d
RBF kernel ``exp(-(z - z')^2 / 2 s_j^2)`` with ``s_j = sqrt(eigenvalue_j)`` (the pooled SD along the
direction) and :data:`MMD_FEATURES` frequencies ``w_f = g_f / s_j``, ``g_f ~ N(0, 1)`` seeded by
``analyze.seed``. :func:`direction_mmd` gives the token-level unbiased MMD^2 (pairs i = j left out, as the
linear share's is token-level too) and its random-feature SD; columns ``mmd2_rf`` and ``mmd2_rf_approx_sd``
of the leading directions (NaN beyond them).

Shapes: N tokens of a block, H heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["store", "layer", "head", "direction", "eigenvalue", "variance_share", "cum_variance_share",
           "mean_diff", "gap_share", "cum_gap_share", "sq_mean_diff", "n_image", "n_text", "mmd2_rf",
           "mmd2_rf_approx_sd"]
MMD_DIRECTIONS = 8  # leading directions with an RF MMD^2
MMD_FEATURES = 128  # random frequencies per direction (1-d: a small D already resolves the kernel well)
SHARES = (0.5, 0.9)
FOLDER = "directions"  # figures go in a subfolder: the report's general picture list globs only *.png on top


@dataclass
class DirectionSums:
    """Mergeable sums of one target and one modality: count, sum and second moment of x - centre."""

    n: float
    s_d: np.ndarray
    S_dd: np.ndarray

    def merge(self, other: DirectionSums) -> DirectionSums:
        return DirectionSums(self.n + other.n, self.s_d + other.s_d, self.S_dd + other.S_dd)

    @property
    def mean_d(self) -> np.ndarray:
        return self.s_d / self.n


@dataclass(frozen=True)
class DirectionPlan:
    """What :func:`direction_sums` computes: target id -> (head positions in the block, centre (d,))."""

    targets: dict[int, tuple[list[int], np.ndarray]]
    mods: tuple[str, ...]
    batch_rows: int = 4096


def vectors(block_NHd: np.ndarray, heads: list[int]) -> np.ndarray:
    """A head's vectors, or the heads stacked as extra vectors (the pooled target)."""
    return np.asarray(block_NHd)[:, heads].reshape(-1, block_NHd.shape[-1])


def sums_of(x_Nd: np.ndarray, centre_d: np.ndarray, batch_rows: int = 4096) -> DirectionSums:
    """Float64 sums of ``x - centre`` in batches (bounded temporary memory)."""
    d = x_Nd.shape[1]
    s_d, S_dd = np.zeros(d), np.zeros((d, d))
    for lo in range(0, len(x_Nd), batch_rows):
        y = np.asarray(x_Nd[lo:lo + batch_rows], np.float64) - centre_d
        s_d += y.sum(0)
        S_dd += y.T @ y
    return DirectionSums(float(len(x_Nd)), s_d, S_dd)


def direction_sums(item: dict, plan: DirectionPlan) -> dict[int, dict[str, DirectionSums]]:
    """One joint block (modality -> (keys (N, H, d), sample ids) or None) -> sums per target and modality."""
    out: dict[int, dict[str, DirectionSums]] = {}
    for t, (heads, centre_d) in plan.targets.items():
        d = len(centre_d)
        out[t] = {m: (sums_of(vectors(item[m][0], heads), centre_d, plan.batch_rows) if item.get(m) is not None
                      else DirectionSums(0.0, np.zeros(d), np.zeros((d, d)))) for m in plan.mods}
    return out


def merge(a: dict[int, dict[str, DirectionSums]], b: dict[int, dict[str, DirectionSums]]
          ) -> dict[int, dict[str, DirectionSums]]:
    return {t: {m: s.merge(b[t][m]) for m, s in by.items()} for t, by in a.items()}


def decompose(image: DirectionSums, text: DirectionSums) -> dict[str, np.ndarray]:
    """Principal directions of the pooled keys and the mean difference's share along each (descending)."""
    n = image.n + text.n
    mean_d = (image.s_d + text.s_d) / n
    cov_dd = (image.S_dd + text.S_dd) / n - np.outer(mean_d, mean_d)
    evals, evecs_dd = np.linalg.eigh((cov_dd + cov_dd.T) / 2)
    order = np.argsort(evals)[::-1]
    evals, evecs_dd = np.clip(evals[order], 0, None), evecs_dd[:, order]
    delta_d = image.mean_d - text.mean_d  # the centre cancels
    proj = evecs_dd.T @ delta_d
    sq = float(delta_d @ delta_d)
    share = proj**2 / sq if sq > 0 else np.full(len(proj), np.nan)
    return {"eigenvalue": evals, "variance_share": evals / evals.sum(), "mean_diff": proj, "gap_share": share,
            "sq_mean_diff": sq, "evecs_dd": evecs_dd}


@dataclass(frozen=True)
class MMDPlan:
    """What :func:`direction_mmd_sums` computes: target id -> (head positions, centre (d,), leading directions
    (d, r), frequencies (r, F) per direction)."""

    targets: dict[int, tuple[list[int], np.ndarray, np.ndarray, np.ndarray]]
    mods: tuple[str, ...]
    batch_rows: int = 4096


def mmd_plan(plan: DirectionPlan, decomposed: dict[int, dict], seed: int, n_dirs: int = MMD_DIRECTIONS,
             n_freq: int = MMD_FEATURES) -> MMDPlan:
    """Leading directions of each target (``decomposed``: :func:`decompose` per target) and their frequencies;
    a direction without variance gets none (its MMD^2 is NaN)."""
    g_F = np.random.default_rng([seed, 0xD12]).standard_normal(n_freq)
    targets = {}
    for t, (heads, centre_d) in plan.targets.items():
        dec = decomposed[t]
        r = min(n_dirs, len(dec["eigenvalue"]))
        sd_r = np.sqrt(dec["eigenvalue"][:r])
        with np.errstate(divide="ignore"):
            w_rF = np.where(sd_r[:, None] > 0, g_F[None, :] / sd_r[:, None], np.nan)
        targets[t] = (heads, centre_d, dec["evecs_dd"][:, :r].copy(), w_rF)
    return MMDPlan(targets, plan.mods, plan.batch_rows)


@dataclass
class MMDSums:
    """Mergeable sums of one target and modality: count and the feature sums (r, 2, F) along each direction."""

    n: float
    feat_r2F: np.ndarray

    def merge(self, other: MMDSums) -> MMDSums:
        return MMDSums(self.n + other.n, self.feat_r2F + other.feat_r2F)


def feature_sums(x_Nd: np.ndarray, centre_d: np.ndarray, u_dr: np.ndarray, w_rF: np.ndarray,
                 batch_rows: int = 4096) -> MMDSums:
    """Sums of cos / sin(w_f u_j . (x - centre)) over the rows (the centre only shifts phases: MMD^2 unchanged)."""
    out = np.zeros((u_dr.shape[1], 2, w_rF.shape[1]))
    for lo in range(0, len(x_Nd), batch_rows):
        z_Nr = (np.asarray(x_Nd[lo:lo + batch_rows], np.float64) - centre_d) @ u_dr
        phase_NrF = z_Nr[:, :, None] * w_rF[None]
        out[:, 0] += np.cos(phase_NrF).sum(0)
        out[:, 1] += np.sin(phase_NrF).sum(0)
    return MMDSums(float(len(x_Nd)), out)


def direction_mmd_sums(item: dict, plan: MMDPlan) -> dict[int, dict[str, MMDSums]]:
    """One joint block -> random-feature sums per target, modality and leading direction."""
    out: dict[int, dict[str, MMDSums]] = {}
    for t, (heads, centre_d, u_dr, w_rF) in plan.targets.items():
        out[t] = {m: (feature_sums(vectors(item[m][0], heads), centre_d, u_dr, w_rF, plan.batch_rows)
                      if item.get(m) is not None else MMDSums(0.0, np.zeros((u_dr.shape[1], 2, w_rF.shape[1]))))
                  for m in plan.mods}
    return out


def merge_mmd(a: dict[int, dict[str, MMDSums]], b: dict[int, dict[str, MMDSums]]) -> dict[int, dict[str, MMDSums]]:
    return {t: {m: s.merge(b[t][m]) for m, s in by.items()} for t, by in a.items()}


def direction_mmd(image: MMDSums, text: MMDSums) -> tuple[np.ndarray, np.ndarray]:
    """(MMD^2 (r,), random-feature SD (r,)) per direction: the token-level unbiased U-statistic of the 1-d RBF
    kernel's features, per frequency ``(|S_x|^2 - n)/(n(n-1)) + (|S_y|^2 - m)/(m(m-1)) - 2 S_x.S_y/(nm)``
    (a token's cos^2 + sin^2 = 1), averaged over frequencies; SD = sd of the per-frequency terms / sqrt(F)."""
    n, m = image.n, text.n
    if min(n, m) < 2:
        nan = np.full(len(image.feat_r2F), np.nan)
        return nan, nan
    sx, sy = image.feat_r2F, text.feat_r2F
    t_rF = (((sx**2).sum(1) - n) / (n * (n - 1)) + ((sy**2).sum(1) - m) / (m * (m - 1))
            - 2 * (sx * sy).sum(1) / (n * m))
    return t_rF.mean(1), t_rF.std(1, ddof=1) / np.sqrt(t_rF.shape[1])


def n_for(cum_share: np.ndarray, q: float) -> int:
    """The fewest leading directions whose cumulative share reaches ``q`` (up to rounding)."""
    return int(np.searchsorted(np.asarray(cum_share), q - 1e-9) + 1)


def direction_rows(store: str, layer: int, sums: dict[int, dict[str, DirectionSums]], mods: list[str],
                   mmd: dict[int, dict[str, MMDSums]] | None = None) -> list[dict]:
    """Rows of the directions table (one per target and principal direction); ``mods`` = [image, text];
    ``mmd``: the second pass's sums (:func:`direction_mmd_sums`) for the RF MMD^2 of the leading directions."""
    rows = []
    for t, by in sums.items():
        img, txt = by[mods[0]], by[mods[1]]
        dec = decompose(img, txt)
        cum_var, cum_gap = np.cumsum(dec["variance_share"]), np.cumsum(dec["gap_share"])
        mmd2 = sd = np.zeros(0)
        if mmd is not None:
            mmd2, sd = direction_mmd(mmd[t][mods[0]], mmd[t][mods[1]])
        for j in range(len(dec["eigenvalue"])):
            rows.append({"store": store, "layer": layer, "head": t, "direction": j + 1,
                         "eigenvalue": dec["eigenvalue"][j], "variance_share": dec["variance_share"][j],
                         "cum_variance_share": cum_var[j], "mean_diff": dec["mean_diff"][j],
                         "gap_share": dec["gap_share"][j], "cum_gap_share": cum_gap[j],
                         "sq_mean_diff": dec["sq_mean_diff"], "n_image": int(img.n), "n_text": int(txt.n),
                         "mmd2_rf": float(mmd2[j]) if j < len(mmd2) else np.nan,
                         "mmd2_rf_approx_sd": float(sd[j]) if j < len(sd) else np.nan})
    return rows


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per store, layer and head: the squared mean difference and the directions holding 50% / 90% of it
    (and of the variance, for comparison)."""
    out = []
    for (store, layer, head), g in table.groupby(["store", "layer", "head"], sort=True):
        g = g.sort_values("direction")
        row = {"store": store, "layer": int(layer), "head": int(head), "d": len(g),
               "sq_mean_diff": float(g.sq_mean_diff.iloc[0])}
        if "mmd2_rf" in g.columns and g.mmd2_rf.notna().any():
            top = g.loc[g.mmd2_rf.idxmax()]
            row.update({"mmd2_rf_dir1": float(g.mmd2_rf.iloc[0]), "mmd2_rf_max": float(top.mmd2_rf),
                        "mmd2_rf_max_at": int(top.direction)})
        for q in SHARES:
            row[f"gap_n{int(q * 100)}"] = n_for(g.cum_gap_share.to_numpy(), q)
        for q in SHARES:
            row[f"variance_n{int(q * 100)}"] = n_for(g.cum_variance_share.to_numpy(), q)
        out.append(row)
    return pd.DataFrame(out)


def write_directions(rows: list[dict], out: Path, pooled: int) -> None:
    """``directions.parquet`` / ``.csv`` beside results.parquet, and one figure per store and layer."""
    if not rows:
        return
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.to_parquet(out / "directions.parquet", index=False)
    table.to_csv(out / "directions.csv", index=False)
    several = table.store.nunique() > 1
    for (store, layer), g in table.groupby(["store", "layer"], sort=True):
        tag = f"{Path(store).name}_" if several else ""
        save_figure(g, out / FOLDER / f"directions_{tag}layer{int(layer):02d}.png", pooled,
                    f"layer {int(layer)}" + (f" — {Path(store).name}" if several else ""))


def save_figure(g: pd.DataFrame, path: Path, pooled: int, title: str) -> None:
    """Cumulative share of the squared mean difference vs the number of leading principal directions (heads
    pooled bold, each head thin), the cumulative PCA variance share dashed beside it."""
    from kscale import reporting as rep

    plt = rep.plt()
    path.parent.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    main = pooled if (g["head"] == pooled).any() else int(g["head"].min())
    for head, h in g.groupby("head", sort=True):
        h = h.sort_values("direction")
        bold = head == main
        label = ("heads pooled" if head == pooled else f"head {head}") if bold else None
        ax.plot(h.direction, h.cum_gap_share, color="tab:red", lw=2 if bold else 0.7, alpha=1 if bold else 0.4,
                marker="o" if bold else None, ms=3, label=f"gap share ({label})" if label else None)
        if bold:
            ax.plot(h.direction, h.cum_variance_share, color="tab:blue", ls="--", lw=1.5,
                    label="PCA variance share")
    for q in SHARES:
        ax.axhline(q, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="leading principal directions of the pooled keys", ylabel="cumulative share", ylim=(0, 1.03),
           title=f"Where the gap lives — {title}")
    rep.integer_ticks(ax)
    ax.legend(fontsize=7, loc="lower right")
    rep.save_figure(fig, path, (
        f"{title}: cumulative share of the squared image-text mean difference (= linear MMD²) along the "
        "leading principal directions of the pooled keys (red; bold: heads pooled, thin: each KV head), and "
        "the cumulative share of the variance (blue, dashed). Dotted lines: 50% and 90%."))
