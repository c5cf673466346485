"""The self-contained ``report.html`` of an analysis run directory (the pictures are drawn by
:mod:`kscale.analysis.figures`).

:func:`build_report` needs only the run directory (``results.parquet``, ``meta.json``, ``*.png`` and
their captions), so ``kscale report RUN_DIR`` can rebuild the page at any time. What the page
concludes (verdict, noise floor, significance, sensitivity) is computed in
:mod:`kscale.analysis.verdict`; the page skeleton and figure checks are :mod:`kscale.reporting`.

Page order: verdict, the store(s) named once, the layer table of the primary setting, sensitivity
across settings, pictures (by layer, per head, gap/noise heatmap, sensitivity, JSD, attention,
PCA/t-SNE), how to read the estimators, rows per estimator, run metadata.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kscale import reporting as rep
from kscale.analysis import verdict as V
from kscale.analysis.qgap import verdict_sentence

FIGURE_ORDER = ("mmd_by_layer", "mmd_per_head", "heatmap", "sensitivity", "jsd_by_layer", "attention_vs_gap",
                "pca", "tsne")  # page order of the pictures, by file name prefix


def _order(png: Path) -> tuple[int, str]:
    for i, prefix in enumerate(FIGURE_ORDER):
        if png.name.startswith(prefix):
            return i, png.name
    return len(FIGURE_ORDER), png.name


def _interval(v: float, lo: float, hi: float) -> str:
    if np.isneginf(lo) and np.isposinf(hi):  # Fieller, when the denominator is indistinguishable from 0
        return f"{rep.fmt(v)} [unbounded]"
    return f"{rep.fmt(v)} [{rep.fmt(lo)}, {rep.fmt(hi)}]"


UNBOUNDED = ("<b>[unbounded]</b> (ratio columns): the intra-modal value is indistinguishable from 0, so the "
             "ratio has no finite Fieller interval; read <i>gap / noise</i> instead.")


def deepstack_marks(meta: dict) -> dict[str, set[int]]:
    """Store path -> layers whose keys are computed right after a DeepStack injection (Qwen3-VL adds vision
    features to the image tokens after each layer the store lists in ``model.deepstack_layers``)."""
    return {s["path"]: {d + 1 for d in s.get("attrs", {}).get("model", {}).get("deepstack_layers", [])}
            for s in meta.get("stores", [])}


DEEPSTACK_NOTE = ("<b>DeepStack</b> (layer marked): the model added intermediate vision-tower features to the image "
                  "tokens' hidden states right before this layer, so its gap is not only the language model's own.")


def layer_table(df: pd.DataFrame, alpha: float, marks: dict[str, set[int]] | None = None) -> str:
    """The primary setting per layer (heads pooled): cross, intra, noise floor, gap/noise, p, verdict.
    ``marks``: layers to flag per store (:func:`deepstack_marks`)."""
    setting = V.primary_setting(df)
    if setting is None:
        return ""
    t = V.gap_table(df, setting, "pooled", alpha)
    ratios = _ratio_columns(df, setting, t)
    parts, unbounded, marked = [], False, False
    for store, g in t.groupby("store", sort=False):
        flag = (marks or {}).get(store, set())
        marked = marked or bool(flag & set(g.layer.astype(int)))
        tab = pd.DataFrame({
            "layer": [f"{int(li)} (DeepStack)" if int(li) in flag else int(li) for li in g.layer],
            "cross-modal MMD² [95% CI]": [_interval(*r) for r in zip(g.cross, g.cross_ci_low, g.cross_ci_high)],
            "intra text": [_interval(*r) for r in zip(g.intra_text, g.intra_text_ci_low, g.intra_text_ci_high)],
            "intra image": [_interval(*r) for r in zip(g.intra_image, g.intra_image_ci_low, g.intra_image_ci_high)],
            "noise floor": [rep.fmt(v) for v in g.noise_floor],
            "gap / noise": [rep.fmt(v, 2) for v in g.gap_over_noise],
            "p (Holm)": [rep.fmt(v, 2) if np.isfinite(v) else "—" for v in g.p_holm],
            "p test": [V.p_test(m, p) for m, p in zip(g.p_method, g.cross_p)],
            "significant": ["yes" if s else "no" for s in g.significant]})
        for col, values in ratios.get(store, {}).items():
            tab[col] = values
            unbounded = unbounded or any(v.endswith("[unbounded]") for v in values)
        title = f"<h3>{html.escape(V.short_store(store))}</h3>" if t.store.nunique() > 1 else ""
        parts.append(title + tab.to_html(index=False, border=0, escape=True))
    return (f"<h2>Per layer: {html.escape(setting.label())}, "
            f"{'KV heads pooled' if (setting.select(df)['head'] == V.POOLED).any() else 'first KV head'}</h2>"
            + "".join(parts) + f'<p class="muted">{V.DEFINITIONS}{" " + UNBOUNDED if unbounded else ""}'
            f'{" " + DEEPSTACK_NOTE if marked else ""}</p>')


def _ratio_columns(df: pd.DataFrame, setting, t: pd.DataFrame) -> dict[str, dict[str, list[str]]]:
    """Normalised-gap rows of the primary setting (``cross/intra_*`` comparisons), aligned to ``t``'s layers."""
    keys = [k for k, _ in setting.keys if k not in ("estimator",)]
    rat = df[df.comparison.astype(str).str.startswith("cross/")]
    if rat.empty:
        return {}
    for k in keys:
        v = setting.get(k)
        if k in rat.columns and not V._missing(v) and rat[k].notna().any():
            rat = rat[rat[k] == v]
    out: dict[str, dict[str, list[str]]] = {}
    for store, g in t.groupby("store", sort=False):
        cols = {}
        for comp, r in rat[(rat.store == store) & rat["head"].isin(g["head"].unique())].groupby("comparison"):
            r = r.drop_duplicates("layer").set_index("layer").reindex(g.layer)
            cols[f"{comp} [CI]"] = [_interval(*x) if np.isfinite(x[0]) else "" for x in
                                    zip(r.value.astype(float), r.ci_low.astype(float), r.ci_high.astype(float))]
        out[store] = cols
    return out


def sensitivity_table(df: pd.DataFrame, alpha: float) -> str:
    sens = V.sensitivity(df, alpha)
    if sens.empty:
        return ""
    several = sens.store.nunique() > 1
    tab = pd.DataFrame({
        **({"store": sens.store.map(V.short_store)} if several else {}),
        "setting": sens.setting + np.where(sens.primary, " (primary)", ""),
        "significant layers": [f"{a} of {b}" for a, b in zip(sens.significant_layers, sens.layers)],
        "median gap / noise": [rep.fmt(v, 2) for v in sens.median_gap_over_noise],
        "median cross MMD²": [rep.fmt(v) for v in sens.median_cross],
        "agrees with primary": [f"{a:.0%}" if np.isfinite(a) else "" for a in sens.agreement],
        "conclusion holds": ["yes" if h else "no" for h in sens.holds]})
    held = int(sens.holds.sum())
    table = tab.to_html(index=False, border=0)
    if len(tab) > 12:
        table = f"<details><summary>all {len(tab)} settings</summary>{table}</details>"
    return ("<h2>Sensitivity: kernels, normalisations, bandwidths</h2>"
            f"<p>The conclusion of the primary setting holds in {held} of {len(sens)} settings (heads pooled). "
            "Values of different kernels and bandwidths are on different scales; compare the gap over the noise "
            "floor and the layers found significant, not the raw values.</p>" + table)


def p_tests_table(df: pd.DataFrame, alpha: float) -> str:
    """The test behind the p-value of every row family (:func:`verdict.p_tests`), with how many rows reject."""
    t = V.p_tests(df, alpha)
    if t.empty:
        return ""
    return ("<h2>Tests behind the p-values</h2><p>Every row family of the table with the test that gave its "
            f"p-values (<i>p_method</i>; docs/analysis.md, \"p-values\") and how many of its rows have p &lt; {alpha:g} "
            "(unadjusted).</p>" + t.to_html(index=False, border=0, escape=True))


PUBLISHED = "the seed study reports cross ≈ 0.408 and intra ≈ 0.012 (docs/reproduce.md)"


def paper_table(df: pd.DataFrame) -> str:
    """The published convention's rows (mmd2_paper) per layer, heads pooled, with their mean."""
    sel = df[(df.estimator == "mmd2_paper") & ~df.comparison.astype(str).str.contains("/")]
    if sel.empty:
        return ""
    head = V.POOLED if (sel["head"] == V.POOLED).any() else sel["head"].min()
    sel = sel[sel["head"] == head]
    parts = []
    for store, g in sel.groupby("store", sort=False):
        wide = g.pivot_table(index="layer", columns="comparison", values="value", aggfunc="first")
        wide.loc["mean"] = wide.mean()
        title = f"<h3>{html.escape(V.short_store(store))}</h3>" if sel.store.nunique() > 1 else ""
        parts.append(title + rep.table_html(wide.reset_index()))
    conv = json.loads(sel.conventions.iloc[0]) if isinstance(sel.conventions.iloc[0], str) else {}
    how = ", ".join(f"{k} {v}" for k, v in conv.items() if k in ("estimator", "bandwidth_rule", "n_per_side"))
    return ("<h2>Published convention (mmd2_paper)</h2>"
            f"<p>Exact MMD² as the seed study computes it ({html.escape(how)}); only these values compare with "
            f"published numbers: {PUBLISHED}.</p>" + "".join(parts))


EXPLAIN = """
<h2>How to read the estimators</h2>
<ul>
<li><b>mmd2_rf</b>: unbiased MMD² with random Fourier features (kernel, bandwidth = multiple × the median
bandwidth, see the rows' <i>conventions</i>). <i>se</i> is the sampling error clustered by sample buckets,
<i>approx_sd</i> the random-feature approximation error. <i>p</i> (its test in <i>p_method</i> and in the
layer table's <i>p test</i> column): for the primary setting of small runs a sequence-level permutation
test; otherwise, and whenever there are more than <i>significance.max_permutation_units</i> sequences, the
cross-MMD t-test (witness from one half of the sample buckets, its mean gap studentised over the other
half), which needs no permutations and stays valid at any number of samples.</li>
<li><b>mmd2_exact</b>: the same kernels computed exactly on a matched-size subsample.</li>
<li><b>mmd2_paper</b>: the published study's convention (see its <i>conventions</i>); only these rows are
comparable with published numbers (docs/reproduce.md).</li>
<li><b>mmd2_linear</b>: squared distance of the means (linear kernel).</li>
<li><b>jsd_clf_*</b>: lower bounds of the full JSD (log 2 − held-out balanced log-loss of a probe); a bound
at or below 0 is "no evidence", drawn at 0. <b>jsd_hist_*</b>: JSD of one-dimensional views.</li>
<li><b>intra_*</b>: one modality split in two by sample — the noise floor. <b>cross/intra_*</b> rows are
ratios with Fieller intervals (unbounded when the intra value is indistinguishable from 0).</li>
<li>Head −1 in the tables means all selected KV heads pooled.</li>
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
                     "intervals over samples, beside the key gap (cross minus mean intra MMD², primary setting). "
                     "Correlation across layers and layers × KV heads (descriptive: layers are not independent):</p>"
                     f"{rep.table_html(corr)}"
                     f"<details><summary>per layer and head</summary>{rep.table_html(joined[cols])}</details>")
    return ("<h2>Attention utilisation beside the key gap</h2>" + "".join(parts)) if parts else ""


def _query_gap_tables(run: Path) -> dict[str, pd.DataFrame]:
    return {f.stem[len("query_gap_"):]: pd.read_csv(f) for f in sorted(run.glob("query_gap_*.csv"))}


def _query_gap_section(tables: dict[str, pd.DataFrame]) -> str:
    """"What text queries see", when the analysed stores carried query vectors (kscale/analysis/qgap.py)."""
    cols = ["layer", "head", "logit_image_pre", "logit_text_pre", "gap_pre", "gap_pre_ci_low", "gap_pre_ci_high",
            "logit_image_post", "logit_text_post", "gap_post", "gap_post_ci_low", "gap_post_ci_high",
            "span_share", "span_dims", "key_gap_norm"]
    parts = [f"<h3>{html.escape(tag)}</h3>{rep.table_html(t[[c for c in cols if c in t.columns]])}"
             for tag, t in tables.items()]
    return ("<h2>What text queries see</h2><p>Expected attention logit q·k/√d of image and text keys under the "
            "distribution of stored text queries of each KV head's query-head group: pre-RoPE over all pairs "
            "(= mean q · mean k), post-RoPE (as the model scores) over the pairs within each sample, pooled with "
            "pair weights; gap = image − text with a sample-clustered jackknife t interval. <b>span_share</b>: "
            "share of |mean image key − mean text key|² in the span of the text queries' principal directions "
            "holding 99% of their energy (span_dims of them); the rest is invisible to every text query.</p>"
            + "".join(parts)) if parts else ""


def directions_section(run: Path) -> str:
    """Where the gap lives (``directions.parquet``, :mod:`kscale.analysis.directions`): per layer and head, the
    leading principal directions of the pooled keys that hold 50% / 90% of the squared mean difference, and
    the figures (in ``directions/``, so the general picture list does not show them twice)."""
    from kscale.analysis import directions as D

    if not (run / "directions.parquet").exists():
        return ""
    s = D.summary(pd.read_parquet(run / "directions.parquet"))
    s["store"] = [V.short_store(p) for p in s.store]
    s = s.rename(columns={"sq_mean_diff": "|mean diff|² (= linear MMD²)", "gap_n50": "directions for 50% of gap",
                          "gap_n90": "directions for 90% of gap", "variance_n50": "for 50% of variance",
                          "variance_n90": "for 90% of variance", "mmd2_rf_dir1": "RF MMD² along direction 1",
                          "mmd2_rf_max": "largest RF MMD² along one direction", "mmd2_rf_max_at": "at direction"})
    pngs = sorted((run / D.FOLDER).glob("*.png"))
    return ("<h2>Where the gap lives</h2><p>The image − text mean difference projected on the principal directions "
            "of the pooled keys (both modalities, eigenvalues descending): how many leading directions hold 50% "
            "and 90% of its square (which is also the linear MMD²), beside how many hold 50% / 90% of the "
            "variance. The mean difference sees first moments only: the RF MMD² (1-d RBF, bandwidth the pooled SD "
            f"along the direction) of the two modalities' projections on each of the {D.MMD_DIRECTIONS} leading "
            "directions sees their whole distributions. Head −1: KV heads pooled. Per direction: "
            "<code>directions.parquet</code>.</p>"
            + rep.table_html(s) + (f"<details><summary>one figure per layer</summary>{rep.figures_html(pngs)}"
                                   "</details>" if pngs else ""))


def modality_pairs_section(meta: dict, df: pd.DataFrame) -> str:
    """Where a store has video tokens the analysis also ran video vs text and video vs image
    (``meta.json``'s ``modality_pairs``, :func:`kscale.analysis.run.modality_pairs`): the primary setting per
    layer (heads pooled where there are such rows) for each pair beside the configured cross comparison,
    and the pairs skipped and why."""
    notes = meta.get("modality_pairs") or []
    if not notes:
        return ""
    visual = meta.get("config", {}).get("image_modality", "image")
    setting = V.primary_setting(df)
    parts = []
    for store in dict.fromkeys(n["store"] for n in notes):
        mine = [n for n in notes if n["store"] == store]
        ran = {n["comparison"]: " vs ".join(n["pair"]) for n in mine if "skipped" not in n}
        names = {"cross": f"{visual} vs text", **ran}
        skipped = "".join(f"<li>{html.escape(' vs '.join(n['pair']))}: skipped ({html.escape(n['skipped'])})</li>"
                          for n in mine if "skipped" in n)
        table = ""
        sel = setting.select(df) if setting is not None else df.iloc[:0]
        sel = sel[(sel.store == store) & sel.comparison.isin(list(names))]
        if (sel["head"] == V.POOLED).any():
            sel = sel[sel["head"] == V.POOLED]
        if not sel.empty:
            cells = {(r.layer, r.comparison): _interval(r.value, r.ci_low, r.ci_high)
                     + (f", p {rep.fmt(r.p, 2)}" if pd.notna(r.p) else "") for r in sel.itertuples()}
            layers = sorted({int(li) for li in sel.layer})
            tab = pd.DataFrame({"layer": layers, **{label: [cells.get((li, c), "—") for li in layers]
                                                    for c, label in names.items()}})
            table = tab.to_html(index=False, border=0, escape=True)
        title = f"<h3>{html.escape(V.short_store(store))}</h3>" if len({n['store'] for n in notes}) > 1 else ""
        parts.append(title + table + (f"<ul>{skipped}</ul>" if skipped else ""))
    label = html.escape(setting.label()) if setting is not None else "see results.parquet"
    return ("<h2>Video, image and text keys</h2><p>The store has video tokens, so the same layers, heads, "
            "estimators and seed also ran for video vs text and video vs image (comparisons "
            "<code>video_vs_text</code>, <code>video_vs_image</code> in results.parquet), beside the "
            f"{html.escape(visual)} vs text gap. MMD² [95% CI], p: {label}.</p>" + "".join(parts))


def _stores_html(meta: dict, df: pd.DataFrame) -> str:
    paths = [s.get("path", "") for s in meta.get("stores", [])] or list(dict.fromkeys(df.store))
    items = "".join(f"<li><b>{html.escape(V.short_store(p))}</b>: <code>{html.escape(p)}</code></li>" for p in paths)
    return f"<p>Key store{'s' if len(paths) > 1 else ''} analysed (named by folder below):</p><ul>{items}</ul>"


VECTOR_NAMES = {"k": "keys", "q": "queries", "v": "values"}
SPACE_NAMES = {"k": "key", "q": "query", "v": "value"}


def build_report(run_dir: str | Path) -> Path:
    """(Re)build ``report.html`` from a run directory; returns its path."""
    run = Path(run_dir)
    df = pd.read_parquet(run / "results.parquet")
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").exists() else {}
    alpha = float(meta.get("config", {}).get("significance", {}).get("alpha", 0.05))
    pngs = sorted(run.glob("*.png"), key=_order)
    counts = df.pivot_table(index="estimator", columns="comparison", values="layer", aggfunc="size", fill_value=0)
    qgaps = _query_gap_tables(run)
    seen = [html.escape((f"{tag}: " if len(qgaps) > 1 else "") + verdict_sentence(t))
            for tag, t in qgaps.items() if not t.empty]
    kind = str(meta.get("vector") or (df["vector"].iloc[0] if "vector" in df and len(df) else "k"))
    body = (rep.verdict_html(V.verdict(df, alpha) + seen)
            + f"<p class=\"vector\">Vectors compared: <b>{VECTOR_NAMES[kind]}</b> ({kind}; analyze.vector)</p>"
            + _stores_html(meta, df) + f"<p class=\"muted\">{len(df)} rows; alpha = {alpha:g}.</p>"
            + layer_table(df, alpha, deepstack_marks(meta)) + modality_pairs_section(meta, df)
            + sensitivity_table(df, alpha) + p_tests_table(df, alpha) + paper_table(df)
            + "<h2>Pictures</h2>" + rep.figures_html(pngs)
            + _attention_section(run) + _query_gap_section(qgaps) + directions_section(run) + EXPLAIN
            + "<h2>Rows per estimator and comparison</h2>" + counts.reset_index().to_html(index=False, border=0)
            + "<h2>Run metadata</h2><details><summary>meta.json</summary><pre>"
            + html.escape(json.dumps(meta, indent=1, default=str)[:20000]) + "</pre></details>"
            + "<p>The full table is in results.parquet / results.csv next to this file.</p>")
    path = run / "report.html"
    path.write_text(rep.page(f"kscale — {SPACE_NAMES[kind]}-space modality gap", body))
    return path
