"""Where the gap lives: the image/text mean difference along the principal directions of the pooled keys.

Per layer and target (a KV head, or the heads pooled as extra vectors like the MMD's pooled target), one
streaming pass over the layer's joint blocks (``run.layer_items``, the same blocks the MMD streams) sums,
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

Shapes: N tokens of a block, H heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["store", "layer", "head", "direction", "eigenvalue", "variance_share", "cum_variance_share",
           "mean_diff", "gap_share", "cum_gap_share", "sq_mean_diff", "n_image", "n_text"]
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


def n_for(cum_share: np.ndarray, q: float) -> int:
    """The fewest leading directions whose cumulative share reaches ``q`` (up to rounding)."""
    return int(np.searchsorted(np.asarray(cum_share), q - 1e-9) + 1)


def direction_rows(store: str, layer: int, sums: dict[int, dict[str, DirectionSums]], mods: list[str]
                   ) -> list[dict]:
    """Rows of the directions table (one per target and principal direction); ``mods`` = [image, text]."""
    rows = []
    for t, by in sums.items():
        img, txt = by[mods[0]], by[mods[1]]
        dec = decompose(img, txt)
        cum_var, cum_gap = np.cumsum(dec["variance_share"]), np.cumsum(dec["gap_share"])
        for j in range(len(dec["eigenvalue"])):
            rows.append({"store": store, "layer": layer, "head": t, "direction": j + 1,
                         "eigenvalue": dec["eigenvalue"][j], "variance_share": dec["variance_share"][j],
                         "cum_variance_share": cum_var[j], "mean_diff": dec["mean_diff"][j],
                         "gap_share": dec["gap_share"][j], "cum_gap_share": cum_gap[j],
                         "sq_mean_diff": dec["sq_mean_diff"], "n_image": int(img.n), "n_text": int(txt.n)})
    return rows


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per store, layer and head: the squared mean difference and the directions holding 50% / 90% of it
    (and of the variance, for comparison)."""
    out = []
    for (store, layer, head), g in table.groupby(["store", "layer", "head"], sort=True):
        g = g.sort_values("direction")
        row = {"store": store, "layer": int(layer), "head": int(head), "d": len(g),
               "sq_mean_diff": float(g.sq_mean_diff.iloc[0])}
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
