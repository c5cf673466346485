"""Pictures and the HTML of a bias run: dependency bars, dropping curves, checkpoint trends.

:func:`write_pictures` draws from ``aggregate.parquet`` only; :func:`report_section` returns the HTML
fragment (headline table + pictures) that another page can embed (the analysis report), and
:func:`build_report` wraps it into the run's own ``report.html``. Both need only the run directory.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kscale import reporting as rep
from kscale.spec.bias import CONDITIONS, DROP_ORDERS

HEADLINE = ("dependency_blank", "dependency_noise", "dependency_swapped", "dependency_none", "acc_real", "acc_none",
            "follows_image_real", "follows_text_real", "mc_acc_real", "agree_blind", "blind_share",
            "drop_loss_random", "drop_loss_most_attended", "drop_loss_text")
TREND = ("dependency_blank", "dependency_swapped", "blind_share", "follows_image_real", "acc_real")


VARIANT_STYLE = ("o", "s", "D", "^", "v", "P", "X")
ORDER_STYLE = {"random": ("o", "-", -0.03), "least_attended": ("v", "--", -0.01),
               "most_attended": ("^", "-.", 0.01), "text": ("s", ":", 0.03)}
ORDER_LABEL = {"random": "image tokens, random order", "least_attended": "image tokens, least attended first",
               "most_attended": "image tokens, most attended first", "text": "text context tokens"}


def _all(agg: pd.DataFrame) -> pd.DataFrame:
    return agg[agg.task == "all"]


def _err(g: pd.DataFrame) -> np.ndarray:
    return np.nan_to_num(np.vstack([g.value - g.ci_low, g.ci_high - g.value]).astype(float).clip(min=0))


def dependency_bars(agg: pd.DataFrame, path: Path) -> bool:
    sel = _all(agg)
    metrics = [f"dependency_{c}" for c in CONDITIONS[1:] if (sel.metric == f"dependency_{c}").any()]
    if not metrics:
        return False
    plt = rep.plt()
    variants = list(dict.fromkeys(sel.variant))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(metrics) * max(1, len(variants)) ** 0.5 + 2), 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        g = sel[(sel.variant == v)].set_index("metric").reindex(metrics)
        ax.bar(np.arange(len(metrics)) + i * width, g.value, width, yerr=_err(g), capsize=3, label=v)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, [m.replace("dependency_", "") for m in metrics])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="image replaced by", ylabel="ll real − ll condition\n(nats / answer token)",
           title="Visual dependency (0: the image is not used)")
    rep.legend_outside(ax, title="model")
    rep.save_figure(fig, path, (
        "How much the answer's log-likelihood drops when the real image is replaced by a blank image, noise, "
        "another sample's image, or no image at all, per model variant, with 95% bootstrap intervals over "
        "samples. Bars near 0 mean the model answers the same without the image (text bias)."))
    return True


def _curve(sel: pd.DataFrame, order: str) -> pd.DataFrame:
    prefix = f"ll_drop_{order}_"
    g = sel[sel.metric.str.startswith(prefix)].copy()
    g["fraction"] = g.metric.str[len(prefix):].astype(float)
    return g.sort_values("fraction")


def dropping_curves(agg: pd.DataFrame, path: Path) -> bool:
    sel = _all(agg)
    orders = [o for o in DROP_ORDERS if sel.metric.str.startswith(f"ll_drop_{o}_").any()]
    if not orders:
        return False
    plt = rep.plt()
    variants = list(dict.fromkeys(sel.variant))
    ncol = min(2, len(variants))
    nrow = int(np.ceil(len(variants) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol + 2.8, 3.3 * nrow), squeeze=False, sharey=True)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    for ax, v in zip(axes.flat, variants):
        for order in orders:  # marker, line style and a small x offset keep the four orders apart
            marker, ls, dx = ORDER_STYLE[order]
            g = _curve(sel[sel.variant == v], order)
            ax.errorbar(g.fraction + dx, g.value, yerr=_err(g), marker=marker, ls=ls, ms=5, capsize=2,
                        label=ORDER_LABEL[order])
        ax.set(xlabel="fraction of tokens dropped", title=f"model: {v}")
    for row in axes:
        row[0].set_ylabel("answer log-likelihood\n(nats / token)")
    rep.legend_outside(axes[0][-1])
    fig.suptitle("Dropping image tokens (three orders) vs as large a share of text context", fontsize=11)
    rep.save_figure(fig, path, (
        "Answer log-likelihood as a growing fraction of tokens is dropped: image tokens in random order, "
        "least-attended first and most-attended first, and, for comparison, the same share of the text "
        "context. Curves that stay flat while image tokens go mean the image adds little (redundant visual "
        "tokens); 95% bootstrap intervals; the points of each order are offset slightly in x so that the "
        "intervals do not hide one another."))
    return True


def checkpoint_trends(agg: pd.DataFrame, path: Path) -> bool:
    sel = _all(agg)
    runs = [r for r in dict.fromkeys(sel.run) if r]
    if not runs:
        return False
    metrics = [m for m in TREND if (sel.metric == m).any()]
    base = sel[sel.variant == "base"]
    plt = rep.plt()
    ncol = min(3, len(metrics))
    nrow = int(np.ceil(len(metrics) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol + 2.2, 3.1 * nrow), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for i, r in enumerate(runs):
            g = sel[(sel.run == r) & (sel.metric == m)].sort_values("step")
            b = base[base.metric == m]
            if len(b):  # the adapter starts as the base model (B = 0): step 0
                g = pd.concat([b.assign(step=0), g])
            ax.errorbar(g.step, g.value, yerr=_err(g), marker=VARIANT_STYLE[i % len(VARIANT_STYLE)], capsize=3,
                        label=f"run {r}")
        if len(base[base.metric == m]):
            ax.axhline(float(base[base.metric == m].value.iloc[0]), color="grey", lw=0.6, ls=":", label="base model")
        ax.set_xlabel("training step")
        ax.set_xticks(sorted({0, *sel[sel.run.isin(runs)].step.astype(int)}))
        ax.set_title(rep.wrap(TREND_LABEL.get(m, m), 34), fontsize=10)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    rep.legend_outside(axes[0][ncol - 1])
    fig.suptitle("Along training: each checkpoint measured on the same samples", fontsize=11)
    rep.save_figure(fig, path, (
        "Bias measures of every saved checkpoint of each training run (step 0 is the base model: MaLoRA starts "
        "as the identity), with 95% bootstrap intervals; the dotted line is the base model. A rising visual "
        "dependency and a falling blind share mean training made the model use the image more."))
    return True


TREND_LABEL = {"dependency_blank": "visual dependency (blank image)",
               "dependency_swapped": "visual dependency (swapped image)",
               "blind_share": "blind share (answer reached without image)",
               "follows_image_real": "follows the image in conflicts", "acc_real": "accuracy with the image"}


def write_pictures(agg: pd.DataFrame, run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    drawn = []
    for name, fn in (("dependency.png", dependency_bars), ("dropping.png", dropping_curves),
                     ("checkpoints.png", checkpoint_trends)):
        if fn(agg, run_dir / name):
            drawn.append(run_dir / name)
    return drawn


def headline_table(agg: pd.DataFrame) -> pd.DataFrame:
    sel = _all(agg)
    sel = sel[sel.metric.isin(HEADLINE)]
    cell = sel.assign(cell=[f"{v:.3g} [{lo:.3g}, {hi:.3g}]" for v, lo, hi in zip(sel.value, sel.ci_low, sel.ci_high)])
    table = cell.pivot_table(index="metric", columns="variant", values="cell", aggfunc="first", sort=False)
    return table.reindex([m for m in HEADLINE if m in table.index])[list(dict.fromkeys(sel.variant))]


def verdict(agg: pd.DataFrame) -> list[str]:
    """Per variant: does the model use the image (dependency intervals vs 0), how much does the language
    prior explain (blind share), does it follow the image in conflicts; and base vs the others."""
    sel = _all(agg)
    out = []
    for v in dict.fromkeys(sel.variant):
        g = sel[sel.variant == v].set_index("metric")
        deps = [m for m in g.index if m.startswith("dependency_")]
        used = [m.replace("dependency_", "") for m in deps if g.loc[m, "ci_low"] > 0]
        s = (f"<b>{html.escape(str(v))}</b>: the answer depends on the image (dependency interval above 0) "
             f"against {len(used)} of {len(deps)} replacements" + (f" ({', '.join(used)})" if used else ""))
        if "dependency_blank" in g.index:
            r = g.loc["dependency_blank"]
            s += f"; blank image: {rep.fmt(r.value)} nats/token [{rep.fmt(r.ci_low)}, {rep.fmt(r.ci_high)}]"
        if "blind_share" in g.index and np.isfinite(g.loc["blind_share", "value"]):
            s += f"; blind share {rep.fmt(g.loc['blind_share', 'value'], 2)} (1: the language prior explains all)"
        if "follows_image_real" in g.index:
            s += f"; follows the image in {g.loc['follows_image_real', 'value']:.0%} of conflicts"
        if "image_vs_text_drop" in g.index:
            r = g.loc["image_vs_text_drop"]
            more = "less" if r.ci_high < 0 else ("more" if r.ci_low > 0 else "about as much")
            s += f"; dropping image tokens costs {more} than dropping as much text"
        out.append(s + ".")
    return out or ["No aggregate rows: nothing to conclude."]


EXPLAIN = """<ul>
<li><b>dependency_c</b>: answer log-likelihood (nats/token) with the real image minus with condition c
(blank, noise, another sample's image, no image). Near 0: the answer does not use the image.</li>
<li><b>follows_image_real / follows_text_real</b>: on records whose text contradicts the image, how often the
image's answer / the text's claim scores higher.</li>
<li><b>blind_share</b>: share of the answer's log-likelihood gain over a uniform guess that the model reaches
without the image (1: the language prior explains everything — backbone factor). <b>agree_blind</b>: the greedy
answer is the same with and without the image.</li>
<li><b>drop_loss_order</b>: log-likelihood lost on average as image tokens (random, least/most attended first)
or as large a share of text context tokens are dropped (data factor: redundancy of visual tokens).</li>
<li>Intervals: percentile bootstrap over samples. Trends over checkpoints: the objective factor.</li></ul>"""


def report_section(run_dir: str | Path) -> str:
    """The bias section as an HTML fragment (for embedding in another report)."""
    run = Path(run_dir)
    agg = pd.read_parquet(run / "aggregate.parquet")
    pngs = [run / n for n in ("dependency.png", "dropping.png", "checkpoints.png") if (run / n).exists()]
    n = int(_all(agg)[_all(agg).metric == "ll_real"].n.max()) if (agg.metric == "ll_real").any() else 0
    return (rep.verdict_html(verdict(agg))
            + f"<h2>Modality bias (behaviour)</h2><p>Run folder <code>{html.escape(run.name)}</code>; {n} samples "
            f"per variant; cells are value [95% interval].</p>"
            f"{headline_table(agg).to_html(na_rep='', border=0)}{EXPLAIN}{rep.figures_html(pngs)}")


def build_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    meta = json.loads((run / "bias.json").read_text()) if (run / "bias.json").exists() else {}
    body = (f"{report_section(run)}<p>Per-sample rows: samples.parquet; every metric by task: aggregate.parquet / "
            "aggregate.csv.</p><h2>Run metadata</h2><details><summary>bias.json</summary><pre>"
            f"{html.escape(json.dumps(meta, indent=1, default=str)[:20000])}</pre></details>")
    path = run / "report.html"
    path.write_text(rep.page("kscale — modality bias", body))
    return path
