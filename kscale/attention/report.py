"""Attention utilisation by layer and head, with intervals, and beside the key gap.

How it connects: extraction writes the per-(sample, layer, query head) attention table
(``kscale.attention.stats``; ``kscale.store.open(path).table("attention")``); analysis writes the key-gap
table (one row per layer, KV head (-1: heads pooled), comparison in {cross, intra_text, intra_image},
estimator, with value, ci_low, ci_high). The analysis stage calls:

- :func:`utilization` — per layer and head: mean image mass and share, visual attention efficiency
  (mean mass / mean share, a ratio of sample means), the image–text logit gap and entropy, each with a
  percentile bootstrap interval over samples (samples are the independent units; every sample counts
  once, whatever its number of queries). ``level`` picks query heads, KV heads (the query heads of one
  KV head averaged per sample: the heads the key gap is measured on) or layers (all heads averaged).
- :func:`beside_key_gap` — joins utilisation (KV-head and layer levels) with one estimator's key gap:
  MMD cross, intra_text, intra_image and the gap summary (cross minus the mean intra, or their ratio),
  next to efficiency, and the correlation of gap and efficiency across layers and across layers × heads.
- :func:`figure` — both, as one matplotlib figure.

Legend: S samples, L layers, H heads (of the chosen level), R bootstrap replicates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from kscale.attention.stats import flat_columns

Level = Literal["q_head", "kv_head", "layer"]
# per-sample statistics bootstrapped as means; efficiency is derived from the mass and share means
MEAN_STATS = ("mass_image", "share_image", "mass_text", "mass_special", "logit_gap", "entropy")
GAP_COMPARISONS = ("cross", "intra_text", "intra_image")


def _frame(table: Mapping[str, np.ndarray] | pd.DataFrame) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        table = pd.DataFrame({k: np.asarray(v) for k, v in flat_columns(dict(table)).items()})
    df = table
    missing = {"sample_id", "layer", "q_head", "kv_head", "n_queries", "mass_image", "share_image",
               "logit_mean_image", "logit_mean_text", "entropy"} - set(df.columns)
    if missing:
        raise ValueError(f"attention table lacks columns {sorted(missing)} (is it store.table('attention')?)")
    return df


def per_sample(table: Mapping[str, np.ndarray] | pd.DataFrame, level: Level) -> pd.DataFrame:
    """One row per (sample, layer, head of ``level``) with the per-sample statistics to average.

    Samples without queries (``n_queries == 0``, e.g. no image for ``after_image``) are dropped.
    """
    df = _frame(table)
    df = df[df.n_queries > 0].assign(logit_gap=lambda d: d.logit_mean_image - d.logit_mean_text)
    key = {"q_head": "q_head", "kv_head": "kv_head", "layer": None}[level]
    cols = ["sample_id", "layer"] + ([key] if key else [])
    out = df.groupby(cols, sort=True)[list(MEAN_STATS)].mean().reset_index()
    return out.rename(columns={key: "head"}) if key else out.assign(head=-1)


def _bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(R, S) multinomial resampling counts of S samples."""
    rng = np.random.default_rng([seed, n])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def utilization(table: Mapping[str, np.ndarray] | pd.DataFrame, level: Level = "kv_head", *, n_boot: int = 1000,
                alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Per (layer, head) utilisation with percentile bootstrap intervals over samples.

    Columns: layer, head (-1 at level ``layer``), level, n_samples, and for each of mass_image,
    share_image, efficiency_image, mass_text, mass_special, logit_gap (image minus text logit mean),
    entropy: the estimate and ``<name>_ci_low`` / ``<name>_ci_high``.
    """
    ps = per_sample(table, level)
    rows = []
    for (layer, head), g in ps.groupby(["layer", "head"], sort=True):
        X_SK = g[list(MEAN_STATS)].to_numpy(np.float64)
        W_RS = _bootstrap_weights(len(g), n_boot, seed)
        boot_RK = (W_RS @ X_SK) / W_RS.sum(1, keepdims=True)
        est_K = X_SK.mean(0)
        row = {"layer": int(layer), "head": int(head), "level": level, "n_samples": len(g)}
        ests = dict(zip(MEAN_STATS, est_K))
        boots = dict(zip(MEAN_STATS, boot_RK.T))
        ests["efficiency_image"] = ests["mass_image"] / ests["share_image"]
        boots["efficiency_image"] = boots["mass_image"] / boots["share_image"]
        for name in ("mass_image", "share_image", "efficiency_image", "mass_text", "mass_special", "logit_gap",
                     "entropy"):
            lo, hi = np.quantile(boots[name], [alpha / 2, 1 - alpha / 2]) if len(g) > 1 else (np.nan, np.nan)
            row.update({name: float(ests[name]), f"{name}_ci_low": float(lo), f"{name}_ci_high": float(hi)})
        rows.append(row)
    return pd.DataFrame(rows)


def _gap_wide(gap: pd.DataFrame, estimator: str, measure: Literal["excess", "ratio"]) -> pd.DataFrame:
    """One row per (layer, head): mmd_<comparison> (+ CIs) and the gap summary ``gap``."""
    sel = gap[(gap.estimator == estimator) & gap.comparison.isin(GAP_COMPARISONS)]
    if sel.empty:
        raise ValueError(f"key-gap table has no rows of estimator {estimator!r} with comparisons "
                         f"{list(GAP_COMPARISONS)} (estimators: {sorted(gap.estimator.unique())})")
    dup = sel.duplicated(["layer", "head", "comparison"])
    if dup.any():
        raise ValueError(f"key-gap table has {int(dup.sum())} repeated (layer, head, comparison) rows for estimator "
                         f"{estimator!r}: filter it to one kernel / normalisation / bandwidth first")
    wide = sel.pivot(index=["layer", "head"], columns="comparison", values=["value", "ci_low", "ci_high"])
    out = pd.DataFrame(index=wide.index)
    for comp in GAP_COMPARISONS:
        out[f"mmd_{comp}"] = wide[("value", comp)] if ("value", comp) in wide else np.nan
        for b in ("ci_low", "ci_high"):
            out[f"mmd_{comp}_{b}"] = wide[(b, comp)] if (b, comp) in wide else np.nan
    intra = out[["mmd_intra_text", "mmd_intra_image"]].mean(axis=1)
    out["gap"] = out.mmd_cross - intra if measure == "excess" else out.mmd_cross / intra
    return out.reset_index()


def correlation(x: np.ndarray, y: np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """Pearson r with a Fisher-z interval and Spearman rho, over the finite pairs.

    Points (layers, heads) are not independent samples: read the interval as descriptive.
    """
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = np.asarray(x)[ok], np.asarray(y)[ok]
    n = int(ok.sum())
    if n < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"n": n, "pearson_r": np.nan, "pearson_ci_low": np.nan, "pearson_ci_high": np.nan,
                "pearson_p": np.nan, "spearman_rho": np.nan, "spearman_p": np.nan}
    r, p = sps.pearsonr(x, y)
    rho, p_s = sps.spearmanr(x, y)
    z, q = np.arctanh(np.clip(r, -0.999999, 0.999999)), sps.norm.ppf(1 - alpha / 2)
    lo, hi = (np.tanh(z - q / np.sqrt(n - 3)), np.tanh(z + q / np.sqrt(n - 3))) if n > 3 else (np.nan, np.nan)
    return {"n": n, "pearson_r": float(r), "pearson_ci_low": float(lo), "pearson_ci_high": float(hi),
            "pearson_p": float(p), "spearman_rho": float(rho), "spearman_p": float(p_s)}


def beside_key_gap(table: Mapping[str, np.ndarray] | pd.DataFrame, gap: pd.DataFrame, *,
                   estimator: str = "mmd2_rf", measure: Literal["excess", "ratio"] = "excess",
                   n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(joined, correlations): utilisation next to the key gap, and how the two co-vary.

    ``joined`` has one row per layer (head -1: utilisation with heads averaged, key gap of pooled heads)
    and per (layer, KV head), with mmd_* columns, ``gap`` and the utilisation columns. ``correlations``
    has one row per scope ("layers", "layers x heads") correlating ``gap`` with ``efficiency_image``.
    """
    util = pd.concat([utilization(table, lvl, n_boot=n_boot, alpha=alpha, seed=seed) for lvl in ("layer", "kv_head")])
    joined = util.merge(_gap_wide(gap, estimator, measure), on=["layer", "head"], how="inner")
    joined = joined.sort_values(["head", "layer"]).reset_index(drop=True)
    scopes = {"layers": joined[joined["head"] == -1], "layers x heads": joined[joined["head"] >= 0]}
    corr = pd.DataFrame([{"scope": s, "x": "gap", "y": "efficiency_image",
                          **correlation(d.gap.to_numpy(float), d.efficiency_image.to_numpy(float), alpha)}
                         for s, d in scopes.items()])
    return joined, corr


def figure(joined: pd.DataFrame, corr: pd.DataFrame, title: str = "visual attention vs key gap"):
    """Left: per layer, efficiency (with interval) and MMD cross / intra; right: gap vs efficiency.

    Legends sit outside the data (right of the left panel, below the colour bar of the right one); layer
    ticks, the colour bar's too, are integers; long titles wrap.
    """
    from kscale import reporting as rep

    plt = rep.plt()
    fig, (ax, ax_sc) = plt.subplots(1, 2, figsize=(13, 5.0), gridspec_kw={"width_ratios": [1.25, 1]},
                                    layout="constrained")
    per_layer = joined[joined["head"] == -1].sort_values("layer")
    if per_layer.empty:  # no pooled key-gap rows: average the KV heads for the picture
        per_layer = joined.groupby("layer", as_index=False).mean(numeric_only=True)
    yerr = np.vstack([per_layer.efficiency_image - per_layer.efficiency_image_ci_low,
                      per_layer.efficiency_image_ci_high - per_layer.efficiency_image])
    ax.errorbar(per_layer.layer, per_layer.efficiency_image, yerr=np.nan_to_num(yerr).clip(min=0), marker="o",
                capsize=3, color="tab:purple", label="image attention efficiency (mass / share)")
    ax.axhline(1, color="grey", lw=0.5)
    ax.set(xlabel="layer", ylabel="attention efficiency", title="per layer")
    rep.integer_ticks(ax)
    ax2 = ax.twinx()
    for comp, colour, marker in (("cross", "tab:red", "s"), ("intra_text", "tab:blue", "^"),
                                 ("intra_image", "tab:green", "v")):
        ax2.plot(per_layer.layer, per_layer[f"mmd_{comp}"], ls="--", marker=marker, ms=4, color=colour,
                 label=f"key MMD² {comp}")
    ax2.set_ylabel("key-gap MMD²")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=rep.LEGEND_FONTSIZE, loc="upper center",
              bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    heads = joined[joined["head"] >= 0]
    sc = ax_sc.scatter(heads.gap, heads.efficiency_image, c=heads.layer, cmap="viridis", s=18)
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(sc, ax=ax_sc, label="layer").ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    row = corr.set_index("scope").loc["layers x heads"] if "layers x heads" in set(corr.scope) else None
    note = f"r = {row.pearson_r:.2f}, rho = {row.spearman_rho:.2f}, n = {row.n}" if row is not None else ""
    ax_sc.set(xlabel="key gap (cross minus mean intra MMD²)", ylabel="image attention efficiency",
              title=rep.wrap(f"layers × KV heads ({note})", 60))
    fig.suptitle(rep.wrap(title, 90), fontsize=11)
    return fig


FIGURE_CAPTION = (
    "Left: how much text queries attend to image keys relative to the image keys' share of the visible keys "
    "(1 = in proportion; below 1 = image keys under-used), per layer with 95% bootstrap intervals over "
    "samples, and the key-space MMD² (dashed, right axis) of the same layers. Right: one point per "
    "(layer, KV head), key gap against attention efficiency, coloured by layer; the correlation is "
    "descriptive (layers and heads are not independent samples).")


def save_figure(joined: pd.DataFrame, corr: pd.DataFrame, path, title: str) -> None:
    """:func:`figure` written as a report picture with its caption (see :mod:`kscale.reporting`)."""
    from pathlib import Path

    from kscale import reporting as rep

    rep.save_figure(figure(joined, corr, title), Path(path), FIGURE_CAPTION)
