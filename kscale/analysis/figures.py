"""The pictures of an analysis run: PNGs drawn from the tidy table (and the layer subsamples for PCA /
t-SNE), each with a caption in words (``kscale.reporting.save_figure``).

:func:`write_pictures` is what ``analysis.run`` calls after the table is written; the page that shows
them in order is :mod:`kscale.analysis.report`. What a figure marks as significant or as the noise floor
comes from :mod:`kscale.analysis.verdict`, so the pictures and the verdict paragraph agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kscale import reporting as rep
from kscale.analysis import verdict as V

COLOURS = {"cross": "tab:red", "intra_text": "tab:blue", "intra_image": "tab:green"}
LABELS = {"cross": "cross-modal (image vs text)", "intra_text": "intra text (noise floor)",
          "intra_image": "intra image (noise floor)"}
STORE_STYLES = ("-", "--", ":", "-.")


def primary_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the primary setting (RF MMD², rbf, raw keys, the multiple closest to 1), every comparison."""
    setting = V.primary_setting(df)
    return df.iloc[0:0] if setting is None else setting.select(df)


def _tag(store: str, several: bool) -> str:
    return f" — {V.short_store(store)}" if several else ""


def mmd_by_layer(df: pd.DataFrame, path: Path) -> bool:
    """Cross vs intra MMD² per layer (heads pooled), with intervals; one line style per store."""
    setting = V.primary_setting(df)
    if setting is None:
        return False
    t = V.gap_table(df, setting, "pooled")
    if t.empty:
        return False
    plt = rep.plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    stores = list(dict.fromkeys(t.store))
    offsets = {"cross": 0.0, "intra_text": -0.08, "intra_image": 0.08}
    for s_i, (store, g) in enumerate(t.groupby("store", sort=False)):
        for comp in ("cross",) + V.INTRA:
            if g[comp].isna().all():
                continue
            yerr = np.vstack([g[comp] - g[f"{comp}_ci_low"], g[f"{comp}_ci_high"] - g[comp]])
            ax.errorbar(g.layer + offsets[comp], g[comp], yerr=np.nan_to_num(yerr).clip(min=0), marker="o", ms=4,
                        capsize=2, color=COLOURS[comp], ls=STORE_STYLES[s_i % 4],
                        label=LABELS[comp] + _tag(store, len(stores) > 1))
        sig = g[g.significant]
        if len(sig):
            ax.scatter(sig.layer, sig.cross_ci_high, marker="*", s=60, color="black", zorder=5,
                       label="significant gap" if s_i == 0 else None)
    ax.axhline(0, color="grey", lw=0.6)
    rep.integer_ticks(ax)
    pooled = (setting.select(df)["head"] == V.POOLED).any()
    ax.set(xlabel="layer", ylabel="MMD²", title=rep.wrap(f"MMD² by layer ({setting.label()}"
                                                         f"{', heads pooled' if pooled else ''})", 70))
    rep.legend_outside(ax)
    rep.save_figure(fig, path, (
        f"Cross-modal and intra-modal MMD² per layer at the primary setting ({setting.label()}"
        f"{', KV heads pooled' if pooled else ''}), with 95% intervals. Stars mark layers whose gap is "
        "significant (Holm-corrected p below alpha and the cross interval above the noise floor). Intra-modal "
        "points are shifted slightly left/right so that their intervals stay visible."))
    return True


def mmd_per_head(df: pd.DataFrame, path: Path) -> bool:
    """One panel per KV head: cross and intra MMD² by layer with interval bands (first store)."""
    setting = V.primary_setting(df)
    if setting is None:
        return False
    t = V.gap_table(df, setting, "each")
    if t.empty:
        return False
    store = t.store.iloc[0]
    t = t[t.store == store]
    heads = sorted(t["head"].unique())
    ncol = min(4, len(heads))
    nrow = int(np.ceil(len(heads) / ncol))
    plt = rep.plt()
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol + 2.2, 2.8 * nrow), squeeze=False, sharey=True)
    for ax, h in zip(axes.flat, heads):
        g = t[t["head"] == h]
        for comp in ("cross",) + V.INTRA:
            if g[comp].isna().all():
                continue
            ax.plot(g.layer, g[comp], marker="o", ms=3, color=COLOURS[comp], label=LABELS[comp])
            ax.fill_between(g.layer, g[f"{comp}_ci_low"], g[f"{comp}_ci_high"], color=COLOURS[comp], alpha=0.2)
        sig = g[g.significant]
        ax.scatter(sig.layer, sig.cross_ci_high, marker="*", s=40, color="black", zorder=5,
                   label="significant gap")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"KV head {int(h)}", fontsize=10)
        ax.set_xlabel("layer")
        rep.integer_ticks(ax)
    for ax in axes.flat[len(heads):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("MMD²")
    rep.legend_outside(axes[0][ncol - 1])
    several = df.store.nunique() > 1
    fig.suptitle(rep.wrap(f"MMD² by layer for each KV head ({setting.label()}){_tag(store, several)}", 80),
                 fontsize=11)
    rep.save_figure(fig, path, (
        f"The same comparison for each KV head separately ({setting.label()}): lines are the estimates, "
        "bands their 95% intervals, stars the significant gaps (Holm over all layer × head cells). "
        "Bandwidths follow the table's bandwidth policy: with a per-head median bandwidth, values of "
        "different heads are on different kernel scales; compare each head's cross line with its own "
        "noise floor."))
    return True


def heatmap(df: pd.DataFrame, path: Path, store: str) -> bool:
    """Gap over noise per (layer, KV head), log colour scale, significance marks, the pooled column first."""
    setting = V.primary_setting(df)
    if setting is None:
        return False
    each = V.gap_table(df, setting, "each")
    pooled = V.gap_table(df, setting, "pooled")
    t = pd.concat([pooled[pooled["head"] == V.POOLED], each])
    t = t[t.store == store]
    if t.empty or t["head"].nunique() < 2 and not (t["head"] >= 0).any():
        return False
    grid = t.pivot_table(index="layer", columns="head", values="gap_over_noise", aggfunc="first")
    sig = t.pivot_table(index="layer", columns="head", values="significant", aggfunc="first")
    plt = rep.plt()
    from matplotlib.colors import LogNorm

    vals = grid.to_numpy(float)
    positive = vals[np.isfinite(vals) & (vals > 0)]
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * grid.shape[1] + 1.6, 1.4 + 0.32 * grid.shape[0]))
    norm = LogNorm(vmin=max(positive.min(), 1e-2), vmax=max(positive.max(), 1.01)) if len(positive) else None
    im = ax.imshow(np.where(vals > 0, vals, np.nan), aspect="auto", cmap="viridis", norm=norm)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = vals[i, j]
            if not np.isfinite(v):
                continue
            mark = "*" if bool(sig.iloc[i, j]) else ""
            ax.text(j, i, f"{v:.2g}{mark}", ha="center", va="center", fontsize=7,
                    color="white" if norm is None or v <= 0 or norm(v) < 0.6 else "black")
    ax.set_xticks(range(grid.shape[1]), ["pooled" if h == V.POOLED else str(int(h)) for h in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(int(l)) for l in grid.index])
    several = df.store.nunique() > 1
    ax.set(xlabel="KV head", ylabel="layer", title=rep.wrap(f"Gap over noise floor{_tag(store, several)}", 40))
    fig.colorbar(im, ax=ax, label="cross MMD² / noise floor")
    rep.save_figure(fig, path, (
        f"Cross-modal MMD² divided by the noise floor (upper 95% bound of the intra-modal baselines) for each "
        f"layer and KV head, {setting.label()}; the first column pools the heads. Log colour scale; a star "
        "marks a significant gap (Holm over the cells, interval above the noise floor). Values at or below 0 "
        "are left blank."))
    return True


def sensitivity_plot(df: pd.DataFrame, path: Path) -> bool:
    """Gap over noise by layer for every setting: kernels x normalisations (left), bandwidths (right)."""
    primary = V.primary_setting(df)
    if primary is None:
        return False
    store = df.store.iloc[0]
    settings = V.settings(df)
    mult = primary.get("multiple")
    at_mult = [s for s in settings if s.get("estimator") == "mmd2_linear" or _close(s.get("multiple"), mult)]
    bandwidths = [s for s in settings if s.get("estimator") == primary.get("estimator")
                  and s.get("kernel") == primary.get("kernel") and s.get("normalisation") == primary.get("normalisation")]
    if len(settings) < 2:
        return False
    plt = rep.plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
    markers = "osD^vP<>Xh*"
    for ax, group, title in ((axes[0], at_mult, "kernels × normalisations"),
                             (axes[1], bandwidths, "bandwidth multiples")):
        for i, s in enumerate(group):
            t = V.gap_table(df, s, "pooled")
            t = t[t.store == store]
            if t.empty:
                continue
            ax.plot(t.layer, t.gap_over_noise.where(t.gap_over_noise > 0), marker=markers[i % len(markers)], ms=4,
                    lw=2.2 if s == primary else 1.0, ls="-" if s.get("estimator") == "mmd2_rf" else "--",
                    label=s.label())
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        rep.integer_ticks(ax)
        ax.set(xlabel="layer", ylabel="cross / noise floor", title=title)
        rep.legend_outside(ax)
    several = df.store.nunique() > 1
    fig.suptitle(rep.wrap(f"Does the gap depend on the kernel, normalisation or bandwidth?{_tag(store, several)}",
                          90), fontsize=11)
    rep.save_figure(fig, path, (
        "Gap over noise floor per layer for every estimator setting in the table (heads pooled). Left: kernels "
        "and key normalisations at the primary bandwidth multiple (solid: random features, dashed: exact or "
        "linear); right: the primary kernel at every bandwidth multiple. The thick line is the primary "
        "setting; the dotted line at 1 is the noise floor. Points at or below 0 are not drawn."))
    return True


def _close(a, b) -> bool:
    return not V._missing(a) and not V._missing(b) and np.isclose(float(a), float(b))


def jsd_by_layer(df: pd.DataFrame, path: Path) -> bool:
    """JSD estimators by layer; classifier lower bounds clipped at 0, 'no evidence' drawn hollow at 0."""
    ests = [e for e in ("jsd_clf_mlp", "jsd_clf_logistic", "jsd_hist_marginal", "jsd_hist_lda", "jsd_hist_pca",
                        "jsd_hist_random") if (df.estimator == e).any()]
    if not ests:
        return False
    sel = df[df.estimator.isin(ests) & ~df.comparison.str.contains("/")]
    head = V.POOLED if (sel["head"] == V.POOLED).any() else sel["head"].min()
    sel = sel[sel["head"] == head]
    store = sel.store.iloc[0]
    sel = sel[sel.store == store]
    units = sel.units.dropna().iloc[0] if sel.units.notna().any() else ""
    groups = [("classifier lower bounds", [e for e in ests if e.startswith("jsd_clf")]),
              ("1-d histogram views", [e for e in ests if e.startswith("jsd_hist")])]
    groups = [(t, es) for t, es in groups if es]
    plt = rep.plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups) + 1.5, 3.8), squeeze=False)
    offsets = {"cross": 0.0, "intra_text": -0.1, "intra_image": 0.1}
    markers = {"jsd_clf_mlp": "o", "jsd_clf_logistic": "s", "jsd_hist_marginal": "o", "jsd_hist_lda": "s",
               "jsd_hist_pca": "D", "jsd_hist_random": "^"}
    styles = {"jsd_clf_mlp": "-", "jsd_clf_logistic": "--", "jsd_hist_marginal": "-", "jsd_hist_lda": "--",
              "jsd_hist_pca": "-.", "jsd_hist_random": ":"}
    for ax, (title, es) in zip(axes[0], groups):
        no_evidence = False
        for est in es:
            for comp, g in sel[sel.estimator == est].groupby("comparison"):
                g = g.sort_values("layer")
                value = g.value.astype(float)
                lo, hi = g.ci_low.astype(float), g.ci_high.astype(float)
                if est.startswith("jsd_clf"):  # a lower bound at or below 0 carries no evidence
                    value, lo, hi = value.clip(lower=0), lo.clip(lower=0), hi.clip(lower=0)
                x = g.layer + offsets.get(comp, 0.0)
                yerr = np.nan_to_num(np.vstack([value - lo, hi - value])).clip(min=0)
                ax.errorbar(x, value, yerr=yerr, marker=markers[est], ms=4, capsize=2, ls=styles[est],
                            color=COLOURS.get(comp), label=f"{est.replace('jsd_', '')}, {comp}")
                if est.startswith("jsd_clf"):
                    none = g.ci_low.astype(float).to_numpy() <= 0
                    if none.any():
                        no_evidence = True
                        ax.scatter(x[none], np.zeros(none.sum()), marker=markers[est], s=40, facecolors="white",
                                   edgecolors=COLOURS.get(comp), zorder=6)
        if no_evidence:
            ax.scatter([], [], marker="o", facecolors="white", edgecolors="black", label="no evidence (bound ≤ 0)")
        ax.axhline(0, color="grey", lw=0.6)
        rep.integer_ticks(ax)
        ax.set(xlabel="layer", ylabel=f"JSD ({units})", title=title)
        rep.legend_outside(ax)
    several = df.store.nunique() > 1
    fig.suptitle(rep.wrap(f"Jensen–Shannon divergence by layer{' (heads pooled)' if head == V.POOLED else ''}"
                          f"{_tag(store, several)}", 80), fontsize=11)
    rep.save_figure(fig, path, (
        f"Jensen–Shannon divergence between image and text keys (red) and the intra-modal baselines (blue, "
        f"green) per layer, in {units}. Left: lower bounds from held-out probes, clipped at 0; a hollow marker "
        "at 0 means the probe found no evidence of a difference (its bound was at or below 0), not that the "
        "divergence is 0. Right: divergences of one-dimensional views (marginals, LDA, PCA, random "
        "directions), which see one direction at a time and can be far below the full JSD."))
    return True


def _embed_pictures(embeds: list[dict], out: Path, cfg) -> None:
    """One picture per layer and method, of the embed's ``maps`` (:func:`embed.maps`, made during the
    analysis; a t-SNE map may still be on its way from the helper process)."""
    from kscale.analysis import embed as E

    plt = rep.plt()
    several = len({e["store"] for e in embeds}) > 1
    for e in embeds:
        maps = E.resolved(e["maps"], cfg.embed.perplexity, cfg.seed)
        labels = maps["labels"]
        name = V.short_store(e["store"]) if e["store"] else ""
        tag = f"{name}_layer{e['layer']:03d}" if name else f"layer{e['layer']:03d}"
        for method in cfg.embed.methods:
            xy, ratio = maps[method]
            if method == "pca":
                title = f"PCA, layer {e['layer']}"
                how = (f"the first two principal components of the standardised keys (explaining {ratio[0]:.0%} "
                       f"and {ratio[1]:.0%} of the variance)")
            else:
                title = f"t-SNE, layer {e['layer']}"
                how = f"a t-SNE map (perplexity {cfg.embed.perplexity:g}) of the standardised keys"
            fig, ax = plt.subplots(figsize=(4.6, 4.2))
            for mod in np.unique(labels):
                m = labels == mod
                ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.5, label=f"{mod} ({m.sum()})")
            ax.set(title=title + (f" — {name}" if several else ""), xticks=[], yticks=[])
            rep.legend_outside(ax, markerscale=3)
            rep.save_figure(fig, out / f"{method}_{tag}.png", (
                f"Keys of layer {e['layer']}{' in ' + name if several else ''}, at most {cfg.embed.subsample} "
                f"tokens of each modality (KV heads concatenated), drawn as {how}. Separate clouds mean the modalities occupy "
                "different regions of key space; distances in a t-SNE map are not to scale."))


def write_pictures(df: pd.DataFrame, embeds: list[dict], out: Path, cfg) -> None:
    out = Path(out)
    mmd_by_layer(df, out / "mmd_by_layer.png")
    mmd_per_head(df, out / "mmd_per_head.png")
    stores = list(dict.fromkeys(df.store))
    for store in stores:
        name = "heatmap_mmd_layer_head.png" if len(stores) == 1 else \
            f"heatmap_mmd_layer_head_{V.short_store(store)}.png"
        heatmap(df, out / name, store)
    sensitivity_plot(df, out / "sensitivity.png")
    jsd_by_layer(df, out / "jsd_by_layer.png")
    _embed_pictures(embeds, out, cfg)
