"""The referee's table: benchmark scores next to the mechanism, before (base) and after (each adapter).

``report.html`` of an eval run (:func:`build_report`, written by :func:`kscale.eval.run.run_eval` and by
``kscale report RUN_DIR``) has, per variant: the lmms-eval scores with their standard errors, the blind
score and the multimodal gain (``scores.json``, :mod:`kscale.eval.table`); and the mechanism per layer --
key MMD² of image vs text keys, attention mass and efficiency on image tokens, the query-visible logit gap
of text queries (image minus text keys) where the store carried queries, and the bias stage's visual
dependency -- each with its interval and its difference from the base variant.

**One source of truth.** The mechanism numbers are not recomputed here: they are read from the runs that
computed them, named per variant in the eval spec (``eval.variants[i].analysis_run`` and ``bias_run``):

- an analysis run (``kind: analyze`` over a store extracted with ``extract.attention.enabled`` and, for the
  query gap, ``extract.attention.store_queries``): ``results.parquet`` rows ``comparison == "cross"``, estimator ``mmd2_rf``, RBF,
  no normalisation, bandwidth multiple 1, head -1 (KV heads pooled) -- the same selection the analysis
  report puts beside attention (:func:`kscale.attention.report.beside_key_gap`);
  ``attention_vs_gap_<store>.csv`` rows of head -1 (level ``layer``: mass_image, efficiency_image with
  bootstrap intervals over samples, :func:`kscale.attention.report.utilization`); ``query_gap_<store>.csv`` (gap_post and its jackknife interval; per KV head);
- a bias run (``kind: bias``): ``aggregate.parquet`` (or ``.csv``) rows of task ``all`` whose metric starts with
  ``dependency_`` (ll_real - ll_<condition>, bootstrap intervals), for the bias variant labelled
  ``bias_variant`` (default: the eval variant's name).

An adapter variant's analysis run must have read stores extracted with that very adapter
(``extract.adapter``; the store records the hash of its files): the table refuses one that read stores of
another model, e.g. the base model's (:func:`check_store_adapter`).

Each stage keeps its own estimator, intervals, sharding and resume, and the table equals their numbers by
construction (tests/integration/test_eval_referee.py checks it against a real extract + analyze run). Recomputing
here would make a second implementation of each estimator that could drift from the stage's. The price:
the runs must have been made on the same images as the benchmark; each mechanism row names its source run
and the data it read (the analysed stores' data identity), so a reader sees when they differ.

Differences from base: ``delta = value - base value`` with a normal-approximation interval whose half-width
is the root sum of squares of the two half-widths (independent runs; conservative where the two are
positively correlated, as on the same images).

Legend of the mechanism table: one row per (variant, measure, layer, head).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kscale import reporting as rep
from kscale.store.layout import is_store, read_root_attrs

KEY_MMD = "key_mmd2"
MEASURES = {  # measure -> what it is (shown on the page)
    KEY_MMD: "MMD² of image vs text keys (random-feature RBF, bandwidth = median, KV heads pooled)",
    "attention_mass_image": "share of attention of text queries that lands on image keys",
    "attention_efficiency_image": "attention mass on image keys / share of image keys (1 = in proportion)",
    "query_gap": "q·k/√d of text queries: image keys minus text keys (post-RoPE)",
}
MECH_COLUMNS = ["variant", "measure", "layer", "head", "value", "ci_low", "ci_high", "source"]


def _rows_from(df: pd.DataFrame, measure: str, value: str, low: str, high: str, source: str) -> list[dict]:
    return [{"measure": measure, "layer": int(r["layer"]), "head": int(r.get("head", -1)), "value": float(r[value]),
             "ci_low": float(r[low]) if low in r and pd.notna(r[low]) else np.nan,
             "ci_high": float(r[high]) if high in r and pd.notna(r[high]) else np.nan, "source": source}
            for _, r in df.iterrows()]


def analysis_rows(run: str | Path) -> list[dict]:
    """Mechanism rows of one analysis run (see the module docstring for the selection)."""
    run = Path(run)
    df = pd.read_parquet(run / "results.parquet")
    sel = df[(df.comparison == "cross") & (df.estimator == "mmd2_rf") & (df.kernel == "rbf")
             & (df.normalisation == "none") & (df["head"] == -1)]
    sel = sel[np.isclose(sel["multiple"].astype(float), 1.0)]
    rows = []
    for store, g in sel.groupby("store", sort=True):
        rows += _rows_from(g, KEY_MMD, "value", "ci_low", "ci_high", f"{run.name}: {Path(store).name}")
    for path in sorted(run.glob("attention_vs_gap_*.csv")):
        util = pd.read_csv(path)
        util = util[util["head"] == -1]  # level "layer": heads averaged
        tag = f"{run.name}: {path.stem[len('attention_vs_gap_'):]}"
        rows += _rows_from(util, "attention_mass_image", "mass_image", "mass_image_ci_low", "mass_image_ci_high", tag)
        rows += _rows_from(util, "attention_efficiency_image", "efficiency_image", "efficiency_image_ci_low",
                           "efficiency_image_ci_high", tag)
    for path in sorted(run.glob("query_gap_*.csv")):
        rows += _rows_from(pd.read_csv(path), "query_gap", "gap_post", "gap_post_ci_low", "gap_post_ci_high",
                           f"{run.name}: {path.stem[len('query_gap_'):]}")
    return rows


def bias_rows(run: str | Path, label: str) -> list[dict]:
    """Visual dependency rows (task ``all``, metrics ``dependency_*``) of bias variant ``label``."""
    run = Path(run)
    agg = pd.read_parquet(run / "aggregate.parquet") if (run / "aggregate.parquet").exists() else pd.read_csv(
        run / "aggregate.csv")
    sel = agg[(agg.variant == label) & (agg.task == "all") & agg.metric.str.startswith("dependency_")]
    if "step" in sel.columns and sel["step"].notna().any():  # checkpoints of a train run: the last one
        sel = sel[sel["step"] == sel["step"].max()]
    if sel.empty:
        raise ValueError(f"{run}: no dependency_* rows of bias variant {label!r} "
                         f"(variants there: {sorted(set(agg.variant))})")
    return [{"measure": f"visual_{m}", "layer": -1, "head": -1, "value": float(r.value), "ci_low": float(r.ci_low),
             "ci_high": float(r.ci_high), "source": f"{run.name}: {label}"} for m, r in sel.set_index("metric").iterrows()]


def analysed_stores(run: str | Path) -> list[Path]:
    """The key stores an analysis run read, as its ``kscale.json`` recorded them (none if it did not)."""
    marker = Path(run) / "kscale.json"
    data = (json.loads(marker.read_text()).get("data") or {}) if marker.is_file() else {}
    return [Path(p) for p in (data.get("stores") or {})]


def check_store_adapter(v: Any) -> None:
    """An adapter variant's key and attention rows must come from stores extracted *with that adapter*
    (``extract.adapter``; a base variant's from stores without one): each store the variant's analysis run
    read records its adapter (kind and a hash of its files, docs/store.md), compared here with the files
    of the variant's own adapter. A store no longer on disk is not checked."""
    want = None
    if v.kind != "base":
        from kscale.adapters import adapter_identity

        want = adapter_identity(v)
    for store in analysed_stores(v.analysis_run):
        if not is_store(store):
            continue
        got = read_root_attrs(store).get("adapter")
        key = [(a["kind"], a["fingerprint"]) if a else None for a in (got, want)]
        if key[0] != key[1]:
            said = [f"{a['kind']} adapter {a['path']!r} (files {a['fingerprint']})" if a else "no adapter"
                    for a in (got, want)]
            raise ValueError(f"eval.variants ({v.name}).analysis_run: {str(v.analysis_run)!r} analysed store "
                             f"{str(store)!r}, extracted with {said[0]}, but variant {v.name!r} is the model with "
                             f"{said[1]}: extract its store with that adapter (extract.adapter, docs/malora.md)")


def mechanism_table(variants: list[Any]) -> pd.DataFrame:
    """All mechanism rows of the eval spec's variants (``analysis_run`` / ``bias_run`` of each); an analysis
    run of stores extracted with another adapter than the variant's is refused (:func:`check_store_adapter`)."""
    rows = []
    for v in variants:
        if v.analysis_run:
            check_store_adapter(v)
        found = (analysis_rows(v.analysis_run) if v.analysis_run else []) + (
            bias_rows(v.bias_run, v.bias_variant or v.name) if v.bias_run else [])
        rows += [{"variant": v.name, **r} for r in found]
    return pd.DataFrame(rows, columns=MECH_COLUMNS)


def _half(lo: Any, hi: Any) -> float:
    return (float(hi) - float(lo)) / 2 if pd.notna(lo) and pd.notna(hi) else np.nan


def with_deltas(table: pd.DataFrame, base: str) -> pd.DataFrame:
    """``table`` with delta (value - base's value on the same measure, layer and head) and its interval."""
    keys = ["measure", "layer", "head"]
    ref = table[table.variant == base][keys + ["value", "ci_low", "ci_high"]]
    out = table.merge(ref, on=keys, how="left", suffixes=("", "_base"))
    out["delta"] = out.value - out.value_base
    half = [math.hypot(_half(a, b), _half(c, d)) for a, b, c, d in
            zip(out.ci_low, out.ci_high, out.ci_low_base, out.ci_high_base)]
    out["delta_ci_low"], out["delta_ci_high"] = out.delta - half, out.delta + half
    out.loc[out.variant == base, ["delta", "delta_ci_low", "delta_ci_high"]] = np.nan
    return out.drop(columns=["value_base", "ci_low_base", "ci_high_base"])


def base_variant(variants: list[Any]) -> str:
    """The "before" of before/after: the first ``kind: base`` variant, else the first variant."""
    return next((v.name for v in variants if v.kind == "base"), variants[0].name)


# ------------------------------------------------------------------------------------------------ page


def _score_figure(scores: pd.DataFrame, path: Path) -> bool:
    if scores.empty:
        return False
    plt = rep.plt()
    labels = [f"{r.task}\n{r.metric.split(',')[0]}" for r in scores.drop_duplicates(["task", "metric"]).itertuples()]
    variants = list(dict.fromkeys(scores.variant))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) * len(variants) ** 0.5), 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        g = scores[scores.variant == v]
        x = np.arange(len(g)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, g.score, width * 0.9, yerr=g.stderr.fillna(0), capsize=3, label=f"{v} (with image)")
        if g.blind_score.notna().any():
            ax.scatter(x, g.blind_score, marker="_", s=300, color="black", zorder=3,
                       label="without image" if i == 0 else None)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("score")
    rep.legend_outside(ax)
    rep.save_figure(fig, path, "Benchmark score of each variant with the image (bars, ± standard error) and without it "
                               "(black marks): the gap between the two is the multimodal gain.")
    return True


def _measure_figure(mech: pd.DataFrame, measure: str, path: Path) -> bool:
    g = mech[(mech.measure == measure) & (mech["head"] == -1)]
    if g.empty or g.layer.nunique() < 1:
        return False
    plt = rep.plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for i, (variant, d) in enumerate(g.groupby("variant", sort=False)):
        d = d.sort_values("layer")
        err = np.vstack([d.value - d.ci_low, d.ci_high - d.value]).clip(min=0)
        ax.errorbar(d.layer + 0.08 * i, d.value, yerr=np.nan_to_num(err), marker="o", capsize=3, label=variant)
    ax.set_xlabel("layer")
    ax.set_ylabel(measure)
    rep.integer_ticks(ax)
    rep.legend_outside(ax)
    rep.save_figure(fig, path, f"{MEASURES[measure].capitalize()}, per layer and variant, with the intervals of the "
                               "run that computed it.")
    return True


def _dependency_figure(mech: pd.DataFrame, path: Path) -> bool:
    g = mech[mech.measure.str.startswith("visual_dependency_")]
    if g.empty:
        return False
    plt = rep.plt()
    conditions = list(dict.fromkeys(g.measure))
    variants = list(dict.fromkeys(g.variant))
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        d = g[g.variant == v].set_index("measure").reindex(conditions)
        x = np.arange(len(conditions)) + (i - (len(variants) - 1) / 2) * width
        err = np.vstack([d.value - d.ci_low, d.ci_high - d.value]).clip(min=0)
        ax.bar(x, d.value, width * 0.9, yerr=np.nan_to_num(err), capsize=3, label=v)
    ax.set_xticks(np.arange(len(conditions)), [c.removeprefix("visual_dependency_") for c in conditions])
    ax.set_ylabel("ll_real − ll_condition")
    rep.legend_outside(ax)
    rep.save_figure(fig, path, "Visual dependency (bias stage): answer log-likelihood with the real image minus with "
                               "the image replaced, per replacement and variant, with bootstrap intervals.")
    return True


def verdict(scores: pd.DataFrame, mech: pd.DataFrame, base: str) -> list[str]:
    """Short sentences: score change and gain change from base, and the mechanism change per measure."""
    out = []
    for r in scores[scores.variant != base].itertuples():
        b = scores[(scores.variant == base) & (scores.task == r.task) & (scores.metric == r.metric)]
        if b.empty:
            continue
        b = b.iloc[0]
        gain = (f"; multimodal gain {rep.fmt(b.gain)} → {rep.fmt(r.gain)}"
                if pd.notna(r.gain) and pd.notna(b.gain) else "")
        out.append(f"<b>{html.escape(r.variant)}</b> on {html.escape(r.task)}: {rep.fmt(b.score)} → "
                   f"{rep.fmt(r.score)} ({r.score - b.score:+.3g}){gain}.")
    for (variant, measure), g in mech[mech.variant != base].groupby(["variant", "measure"], sort=False):
        g = g[g.delta.notna()]
        if g.empty:
            continue
        lower, higher = int((g.delta_ci_high < 0).sum()), int((g.delta_ci_low > 0).sum())
        out.append(f"<b>{html.escape(variant)}</b> vs {html.escape(base)}, {html.escape(measure)}: lower in {lower} "
                   f"and higher in {higher} of {len(g)} rows (interval of Δ excluding 0).")
    return out or ["No variant to compare with the base."]


def build_report(run_dir: str | Path, variants: list[Any] | None = None) -> Path:
    """(Re)build ``report.html`` (and ``mechanism.csv``) of an eval run; ``variants``: the spec's
    (default: those recorded in the run's ``mechanism.json``)."""
    run = Path(run_dir)
    scores = pd.DataFrame(json.loads((run / "scores.json").read_text()))
    if variants is not None:
        mech = mechanism_table(variants)
        base = base_variant(variants)
        (run / "mechanism.json").write_text(json.dumps({"base": base}) + "\n")
    else:
        base = json.loads((run / "mechanism.json").read_text())["base"] if (run / "mechanism.json").exists() else (
            scores.variant.iloc[0] if not scores.empty else "base")
        mech = pd.read_csv(run / "mechanism.csv")[MECH_COLUMNS] if (run / "mechanism.csv").exists() else (
            pd.DataFrame(columns=MECH_COLUMNS))
    mech = with_deltas(mech, base) if not mech.empty else mech.assign(delta=[], delta_ci_low=[], delta_ci_high=[])
    mech.to_csv(run / "mechanism.csv", index=False)
    pngs = [p for p, ok in [(run / "eval_scores.png", _score_figure(scores, run / "eval_scores.png"))]
            + [(run / f"eval_{m}.png", _measure_figure(mech, m, run / f"eval_{m}.png")) for m in MEASURES]
            + [(run / "eval_dependency.png", _dependency_figure(mech, run / "eval_dependency.png"))] if ok]
    score_cols = [c for c in ("variant", "task", "metric", "score", "stderr", "n", "blind_score", "blind_stderr",
                              "gain", "gain_stderr") if c in scores.columns]
    body = (rep.verdict_html(verdict(scores, mech, base))
            + f"<p>Before = <b>{html.escape(base)}</b>; after = every other variant. Scores from lmms-eval "
              "(standard errors as it reports them); gain = score with image − score without (MMStar's blind "
              "baseline), its standard error treating the two runs as independent.</p>"
            + "<h2>Benchmark scores</h2>" + rep.table_html(scores[score_cols])
            + "<h2>Pictures</h2>" + rep.figures_html(pngs)
            + "<h2>Mechanism, before and after</h2>" + _mechanism_html(mech))
    path = run / "report.html"
    path.write_text(rep.page("kscale — adapters judged: benchmarks and mechanism", body))
    return path


def _mechanism_html(mech: pd.DataFrame) -> str:
    if mech.empty:
        return ("<p>No mechanism runs named: set <code>analysis_run</code> / <code>bias_run</code> on the eval "
                "variants (docs/malora.md).</p>")
    items = "".join(f"<li><b>{m}</b>: {html.escape(d)}</li>" for m, d in MEASURES.items())
    items += "<li><b>visual_dependency_*</b>: ll_real − ll_&lt;condition&gt; per answer token (bias stage)</li>"
    return (f"<ul>{items}</ul><p class=\"muted\">Layer/head −1: all layers or KV heads pooled. Δ = variant − base with "
            "a conservative interval (half-widths added in quadrature). Source: the run each row comes from.</p>"
            + rep.table_html(mech))
