"""Pictures and the self-contained ``report.html`` of an analysis run directory.

:func:`write_pictures` draws from the tidy table (and the layer subsamples for PCA / t-SNE);
:func:`build_report` needs only the run directory (``results.parquet``, ``meta.json``, ``*.png``),
so ``kscale report RUN_DIR`` can rebuild the page at any time. Images are embedded as base64.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

COLOURS = {"cross": "tab:red", "intra_text": "tab:blue", "intra_image": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def primary_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the headline estimator: RF MMD^2, rbf, raw keys, the multiple closest to 1."""
    sel = df[(df.estimator == "mmd2_rf") & (df.kernel == "rbf") & (df.normalisation == "none")]
    if sel.empty:
        return sel
    best = sel.multiple.iloc[(np.log(sel.multiple.astype(float))).abs().argmin()]
    return sel[sel.multiple == best]


def _by_layer(df: pd.DataFrame, estimators: list[str], path: Path, ylabel: str, title: str) -> bool:
    plt = _plt()
    head = -1 if (df["head"] == -1).any() else df["head"].min()
    sel = df[df.estimator.isin(estimators) & (df["head"] == head) & ~df.comparison.str.contains("/")]
    if sel.empty:
        return False
    fig, axes = plt.subplots(1, len(estimators), figsize=(5 * len(estimators), 3.6), squeeze=False)
    for ax, est in zip(axes[0], estimators):
        for (store, comp), g in sel[sel.estimator == est].groupby(["store", "comparison"]):
            g = g.sort_values("layer")
            yerr = np.vstack([g.value - g.ci_low, g.ci_high - g.value]).astype(float)
            ax.errorbar(g.layer, g.value, yerr=np.nan_to_num(yerr), marker="o", capsize=3,
                        color=COLOURS.get(comp), label=f"{comp}" + (f" ({Path(store).name})" if
                                                                    sel.store.nunique() > 1 else ""))
        ax.set(xlabel="layer", ylabel=ylabel, title=est)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(title + ("" if head != -1 else " — heads pooled"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _heatmap(df: pd.DataFrame, path: Path) -> bool:
    plt = _plt()
    sel = primary_rows(df)
    sel = sel[(sel.comparison == "cross") & (sel["head"] >= 0)]
    if sel.empty:
        return False
    fig, ax = plt.subplots(figsize=(1 + 0.5 * sel["head"].nunique() + 2, 1 + 0.35 * sel.layer.nunique() + 1))
    grid = sel.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
    im = ax.imshow(grid.values, aspect="auto", cmap="magma")
    ax.set(xticks=range(grid.shape[1]), xticklabels=grid.columns, yticks=range(grid.shape[0]),
           yticklabels=grid.index, xlabel="KV head", ylabel="layer", title="cross-modal MMD² (RF, rbf)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _embed_pictures(embeds: list[dict], out: Path, cfg) -> None:
    from kscale.analysis.embed import pca_2d, stratified, tsne_2d

    plt = _plt()
    for e in embeds:
        x, labels = stratified(e["keys"], cfg.embed.subsample, cfg.seed)
        tag = f"{Path(e['store']).name}_layer{e['layer']:03d}" if e["store"] else f"layer{e['layer']:03d}"
        for method in cfg.embed.methods:
            if method == "pca":
                xy, ratio = pca_2d(x)
                title = f"PCA, layer {e['layer']} (var {ratio[0]:.0%}, {ratio[1]:.0%})"
            else:
                xy = tsne_2d(x, cfg.embed.perplexity, cfg.seed)
                title = f"t-SNE, layer {e['layer']} (perplexity {cfg.embed.perplexity:g})"
            fig, ax = plt.subplots(figsize=(4.5, 4.2))
            for mod in np.unique(labels):
                m = labels == mod
                ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.5, label=f"{mod} ({m.sum()})")
            ax.set(title=title, xticks=[], yticks=[])
            ax.legend(markerscale=4, fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"{method}_{tag}.png", dpi=110)
            plt.close(fig)


def write_pictures(df: pd.DataFrame, embeds: list[dict], out: Path, cfg) -> None:
    prim = primary_rows(df)
    if not prim.empty:
        _by_layer(prim, ["mmd2_rf"], out / "mmd_by_layer.png", "MMD²",
                  f"MMD² by layer (RF, rbf, raw keys, {prim.multiple.iloc[0]:g} x median bandwidth)")
    jsd_est = [e for e in ("jsd_clf_mlp", "jsd_clf_logistic", "jsd_hist_marginal", "jsd_hist_lda")
               if (df.estimator == e).any()]
    if jsd_est:
        units = df[df.estimator.isin(jsd_est)].units.iloc[0]
        _by_layer(df, jsd_est, out / "jsd_by_layer.png", f"JSD ({units})", "JSD by layer")
    _heatmap(df, out / "heatmap_mmd_layer_head.png")
    _embed_pictures(embeds, out, cfg)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


def _summary(df: pd.DataFrame) -> str:
    prim = primary_rows(df)
    prim = prim[prim["head"] == (-1 if (prim["head"] == -1).any() else prim["head"].min())]
    cols = ["store", "layer", "head", "comparison", "multiple", "value", "se", "approx_sd", "ci_low",
            "ci_high", "p", "p_method", "n_tokens", "n_samples"]
    return prim[cols].to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")


EXPLAIN = """
<h2>How to read this</h2>
<ul>
<li><b>mmd2_rf</b>: unbiased MMD² with random Fourier features (kernel, bandwidth = multiple × median
distance). <i>se</i> is the sampling error (witness variance, clustered by sample buckets),
<i>approx_sd</i> the random-feature approximation error. <i>p</i>: cross-MMD (studentised witness, no
permutations) or, for the first kernel of small runs, a sequence-level permutation test.</li>
<li><b>mmd2_exact</b>: the same kernels computed exactly on a matched-size subsample; compare with mmd2_rf.</li>
<li><b>mmd2_paper</b>: paper-compatible convention (see its <i>conventions</i> JSON: biased or not,
bandwidth rule, kernel sum). Only this row is comparable with published numbers.</li>
<li><b>mmd2_linear</b>: squared distance of the means (linear kernel).</li>
<li><b>jsd_clf_*</b>: lower bounds of the full JSD (log 2 − held-out balanced log-loss of a probe).
<b>jsd_hist_*</b>: JSD of 1-d views (marginals, random/PCA/LDA slices), bias-corrected; these see one
direction at a time and can be an order of magnitude below the full JSD.</li>
<li><b>intra_*</b>: the same modality split by sample into halves — the noise floor. <b>cross/intra_*</b>
rows are ratios with Fieller intervals (unbounded when the intra value is not distinguishable from 0).</li>
<li>head = −1 means all selected heads pooled (head vectors as samples).</li>
</ul>"""


def _attention_section(run: Path) -> str:
    """Attention utilisation beside the key gap, when the analysed stores carried attention statistics."""
    parts = []
    for corr_file in sorted(run.glob("attention_gap_correlation_*.csv")):
        tag = corr_file.stem[len("attention_gap_correlation_"):]
        corr = pd.read_csv(corr_file)
        joined = pd.read_csv(run / f"attention_vs_gap_{tag}.csv")
        cols = [c for c in ("layer", "head", "efficiency_image", "efficiency_image_ci_low",
                            "efficiency_image_ci_high", "mmd_cross", "mmd_intra_text", "mmd_intra_image", "gap")
                if c in joined.columns]
        parts.append(f"<h3>{html.escape(tag)}</h3><p>Visual attention efficiency = attention mass on image keys / "
                     "share of image keys among visible keys (1 = attention in proportion), with bootstrap "
                     "intervals over samples, beside the key gap (cross minus mean intra MMD², RF rbf raw keys "
                     "1x median). Correlation across layers and layers x KV heads:</p>"
                     f"{corr.to_html(index=False, float_format=lambda v: f'{v:.4g}')}"
                     f"{joined[cols].to_html(index=False, float_format=lambda v: f'{v:.4g}')}")
    return ("<h2>Attention utilisation beside the key gap</h2>" + "".join(parts)) if parts else ""


def build_report(run_dir: str | Path) -> Path:
    """(Re)build ``report.html`` from a run directory; returns its path."""
    run = Path(run_dir)
    df = pd.read_parquet(run / "results.parquet")
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").exists() else {}
    pngs = sorted(run.glob("*.png"), key=lambda p: (not p.name.startswith(("mmd", "jsd", "heat")), p.name))
    counts = df.groupby(["estimator", "comparison"]).size().rename("rows").reset_index()
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>kscale analysis</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} img{{max-width:100%}} figure{{display:inline-block;margin:6px}}
pre{{background:#f6f6f6;padding:8px;font-size:11px;overflow:auto}}</style></head><body>
<h1>kscale — key-space modality gap</h1>
<p>Stores: {html.escape(', '.join(s.get('path', '') for s in meta.get('stores', [])))}. Rows: {len(df)}.</p>
<h2>Headline: cross vs intra MMD² (RF, rbf, raw keys)</h2>{_summary(df)}
{EXPLAIN}
<h2>Pictures</h2>{''.join(_img(p) for p in pngs)}
{_attention_section(run)}
<h2>Rows per estimator</h2>{counts.to_html(index=False)}
<h2>Run metadata</h2><pre>{html.escape(json.dumps(meta, indent=1, default=str)[:20000])}</pre>
<p>The full table is in results.parquet / results.csv next to this file.</p></body></html>"""
    path = run / "report.html"
    path.write_text(page)
    return path
