"""Pictures and the HTML of a bias run: dependency bars, dropping curves, checkpoint trends.

:func:`write_pictures` draws from ``aggregate.parquet`` only; :func:`report_section` returns the HTML
fragment (headline table + pictures) that another page can embed (the analysis report), and
:func:`build_report` wraps it into the run's own ``report.html``. Both need only the run directory.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kscale.bias.config import CONDITIONS, DROP_ORDERS

HEADLINE = ("dependency_blank", "dependency_noise", "dependency_swapped", "dependency_none", "acc_real", "acc_none",
            "follows_image_real", "follows_text_real", "mc_acc_real", "agree_blind", "blind_share",
            "drop_loss_random", "drop_loss_most_attended", "drop_loss_text")
TREND = ("dependency_blank", "dependency_swapped", "blind_share", "follows_image_real", "acc_real")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _all(agg: pd.DataFrame) -> pd.DataFrame:
    return agg[agg.task == "all"]


def _err(g: pd.DataFrame) -> np.ndarray:
    return np.nan_to_num(np.vstack([g.value - g.ci_low, g.ci_high - g.value]).astype(float).clip(min=0))


def dependency_bars(agg: pd.DataFrame, path: Path) -> bool:
    plt = _plt()
    sel = _all(agg)
    metrics = [f"dependency_{c}" for c in CONDITIONS[1:] if (sel.metric == f"dependency_{c}").any()]
    if not metrics:
        return False
    variants = list(dict.fromkeys(sel.variant))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(metrics) * max(1, len(variants)) ** 0.5 + 2), 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        g = sel[(sel.variant == v)].set_index("metric").reindex(metrics)
        ax.bar(np.arange(len(metrics)) + i * width, g.value, width, yerr=_err(g), capsize=3, label=v)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, [m.replace("dependency_", "") for m in metrics])
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(ylabel="ll_real - ll_condition (nats/token)", title="Visual dependency (0: image unused)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _curve(sel: pd.DataFrame, order: str) -> pd.DataFrame:
    prefix = f"ll_drop_{order}_"
    g = sel[sel.metric.str.startswith(prefix)].copy()
    g["fraction"] = g.metric.str[len(prefix):].astype(float)
    return g.sort_values("fraction")


def dropping_curves(agg: pd.DataFrame, path: Path) -> bool:
    plt = _plt()
    sel = _all(agg)
    orders = [o for o in DROP_ORDERS if sel.metric.str.startswith(f"ll_drop_{o}_").any()]
    if not orders:
        return False
    variants = list(dict.fromkeys(sel.variant))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 3.6), squeeze=False)
    for ax, v in zip(axes[0], variants):
        for order in orders:
            g = _curve(sel[sel.variant == v], order)
            ax.plot(g.fraction, g.value, marker="o", label=order, ls="--" if order == "text" else "-")
            ax.fill_between(g.fraction, g.ci_low, g.ci_high, alpha=0.15)
        ax.set(xlabel="fraction dropped", ylabel="answer log-likelihood / token", title=v)
        ax.legend(fontsize=7)
    fig.suptitle("Redundancy: image tokens dropped (by order) vs text context tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def checkpoint_trends(agg: pd.DataFrame, path: Path) -> bool:
    plt = _plt()
    sel = _all(agg)
    runs = [r for r in dict.fromkeys(sel.run) if r]
    if not runs:
        return False
    metrics = [m for m in TREND if (sel.metric == m).any()]
    base = sel[sel.variant == "base"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.8 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for r in runs:
            g = sel[(sel.run == r) & (sel.metric == m)].sort_values("step")
            b = base[base.metric == m]
            if len(b):  # the adapter starts as the base model (B = 0): step 0
                g = pd.concat([b.assign(step=0), g])
            ax.errorbar(g.step, g.value, yerr=_err(g), marker="o", capsize=3, label=r)
        ax.set(xlabel="training step", title=m)
        ax.legend(fontsize=7)
    fig.suptitle("Objective factor: measures along training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_pictures(agg: pd.DataFrame, run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    drawn = []
    for name, fn in (("dependency.png", dependency_bars), ("dropping.png", dropping_curves),
                     ("checkpoints.png", checkpoint_trends)):
        if fn(agg, run_dir / name):
            drawn.append(run_dir / name)
    return drawn


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


def headline_table(agg: pd.DataFrame) -> pd.DataFrame:
    sel = _all(agg)
    sel = sel[sel.metric.isin(HEADLINE)]
    cell = sel.assign(cell=[f"{v:.3g} [{lo:.3g}, {hi:.3g}]" for v, lo, hi in zip(sel.value, sel.ci_low, sel.ci_high)])
    table = cell.pivot_table(index="metric", columns="variant", values="cell", aggfunc="first", sort=False)
    return table.reindex([m for m in HEADLINE if m in table.index])[list(dict.fromkeys(sel.variant))]


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
    return (f"<h2>Modality bias (behaviour)</h2><p>Run {html.escape(str(run))}; {n} samples per variant.</p>"
            f"{headline_table(agg).to_html(na_rep='')}{EXPLAIN}{''.join(_img(p) for p in pngs)}")


def build_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    meta = json.loads((run / "bias.json").read_text()) if (run / "bias.json").exists() else {}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>kscale bias</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} img{{max-width:100%}} figure{{display:inline-block;margin:6px}}
pre{{background:#f6f6f6;padding:8px;font-size:11px;overflow:auto}}</style></head><body>
<h1>kscale — modality bias</h1>{report_section(run)}
<p>Per-sample rows: samples.parquet; every metric by task: aggregate.parquet / aggregate.csv.</p>
<h2>Run metadata</h2><pre>{html.escape(json.dumps(meta, indent=1, default=str)[:20000])}</pre></body></html>"""
    path = run / "report.html"
    path.write_text(page)
    return path
