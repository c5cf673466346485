"""The train run's ``report.html``: what training did and what it changed, from the run folder alone.

Inputs (all written by :func:`kscale.train.run.run_train`): ``metrics.jsonl`` (loss terms, learning rate,
gradient norm and every layer's gates per logged step), ``eval.json`` (the before/after table of
:mod:`kscale.train.evaluate`: base model, MaLoRA, MaLoRA without its image branch, on held-out records),
``adapter/adapter_config.json`` and ``split.json``. ``kscale report RUN_DIR`` rebuilds the page.

Page: a verdict (steps, losses first → last, key gap before → after with intervals, visual dependency
and LM loss of base vs adapter), the pictures (loss and alignment term, gates per layer, key gap by
layer), the evaluation table with the change against the base model, and the adapter configuration.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from kscale import reporting as rep
from kscale.train.layout import ADAPTER_DIR, METRICS, SPLIT

VARIANT_LABEL = {"base": "base model", "malora": "MaLoRA", "malora_no_image_branch": "MaLoRA, image branch off",
                 "lora": "LoRA"}
VARIANT_STYLE = {"base": ("grey", "o"), "malora": ("tab:red", "s"), "malora_no_image_branch": ("tab:orange", "^"),
                 "lora": ("tab:blue", "D")}
GAP = re.compile(r"key_mmd2_layer(\d+)$")


def read_metrics(run: Path) -> pd.DataFrame:
    """metrics.jsonl as a table: one row per logged step, gates as ``gate:<layer path>.<branch>`` columns."""
    path = run / METRICS
    if not path.exists():
        return pd.DataFrame()
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        gates = rec.pop("gates", None) or {}
        rows.append({**rec, **{f"gate:{k}": v for k, v in gates.items()}})
    df = pd.DataFrame(rows)
    # a resumed run may log a step twice (after the last checkpoint): keep the later record
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True) if len(df) else df


def gate_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Long table of gates: step, layer (int), branch (img/txt), module (e.g. k_proj), value."""
    cols = [c for c in metrics.columns if c.startswith("gate:")]
    if not cols:
        return pd.DataFrame(columns=["step", "layer", "branch", "module", "value"])
    long = metrics.melt(id_vars=["step"], value_vars=cols, var_name="name", value_name="value").dropna()
    parsed = long.name.str.extract(r"layers\.(?P<layer>\d+)\.(?:\w+)\.(?P<module>\w+)\.(?P<branch>img|txt)$")
    return pd.concat([long[["step", "value"]], parsed], axis=1).dropna().astype({"layer": int})


def key_gap_table(table: dict[str, dict[str, float]]) -> pd.DataFrame:
    """layer, variant, value, ci_low, ci_high of the key gap rows of eval.json (intervals when recorded)."""
    rows = []
    for variant, metrics in table.items():
        for name, value in metrics.items():
            m = GAP.match(name)
            if m:
                layer = int(m.group(1))
                rows.append({"layer": layer, "variant": variant, "value": value,
                             "ci_low": metrics.get(f"key_mmd2_ci_low_layer{layer}", np.nan),
                             "ci_high": metrics.get(f"key_mmd2_ci_high_layer{layer}", np.nan)})
    return pd.DataFrame(rows)


def loss_figure(metrics: pd.DataFrame, path: Path) -> bool:
    if metrics.empty or "loss" not in metrics:
        return False
    plt = rep.plt()
    fig, (ax, ax_al) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax.plot(metrics.step, metrics["lm"], marker=".", color="tab:blue", label="LM loss (answer tokens)")
    ax.plot(metrics.step, metrics["loss"], marker=".", color="black", lw=0.8, label="total loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title="Language-model and total loss")
    rep.integer_ticks(ax)
    rep.legend_outside(ax)
    ax_al.plot(metrics.step, metrics["align"], marker=".", color="tab:red", label="alignment term")
    ax_al.set(xlabel="optimizer step", ylabel="alignment loss", title="Key alignment term")
    rep.integer_ticks(ax_al)
    rep.save_figure(fig, path, (
        "Training curves from metrics.jsonl. Left: the language-model loss on answer tokens and the total loss "
        "(LM + weight × alignment). Right: the alignment term alone (how far image keys are from text keys "
        "under the objective's estimate); it should fall as the image branch moves image keys."))
    return True


def gates_figure(metrics: pd.DataFrame, path: Path) -> bool:
    gates = gate_table(metrics)
    if gates.empty:
        return False
    plt = rep.plt()
    fig, (ax, ax_last) = plt.subplots(1, 2, figsize=(12, 3.8))
    cmap = plt.get_cmap("viridis")
    layers = sorted(gates.layer.unique())
    for (layer, branch, module), g in gates.groupby(["layer", "branch", "module"]):
        colour = cmap(layers.index(layer) / max(1, len(layers) - 1))
        ax.plot(g.step, g.value, color=colour, ls="-" if branch == "img" else "--", lw=1)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color="black", ls="-", label="image branch"),
                       Line2D([], [], color="black", ls="--", label="text branch")],
              fontsize=rep.LEGEND_FONTSIZE, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers), max(layers, default=1) or 1))
    bar = fig.colorbar(sm, ax=ax, label="layer")
    bar.set_ticks(layers if len(layers) <= 12 else np.linspace(min(layers), max(layers), 6).round().astype(int))
    ax.set(xlabel="optimizer step", ylabel="gate value", title="Gates along training (one line per layer)")
    rep.integer_ticks(ax)
    last = gates[gates.step == gates.step.max()].groupby(["layer", "branch"]).value.mean().unstack()
    width = 0.4
    for i, branch in enumerate([b for b in ("img", "txt") if b in last.columns]):
        ax_last.bar(last.index + (i - 0.5) * width, last[branch], width,
                    label={"img": "image branch", "txt": "text branch"}[branch])
    ax_last.set(xlabel="layer", ylabel="gate value", title=f"Gates per layer at step {int(gates.step.max())}")
    rep.integer_ticks(ax_last)
    rep.legend_outside(ax_last)
    rep.save_figure(fig, path, (
        "The learned gate that scales each layer's low-rank update, per branch. Left: along training, one line "
        "per adapted layer (colour), solid for the image branch, dashed for the text branch. Right: the gates at "
        "the last logged step (averaged over the adapted projections of a layer)."))
    return True


def key_gap_figure(table: dict[str, dict[str, float]], path: Path) -> bool:
    gap = key_gap_table(table)
    if gap.empty:
        return False
    plt = rep.plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    offsets = {"base": -0.12, "malora": 0.0, "malora_no_image_branch": 0.12}
    for variant, g in gap.groupby("variant", sort=False):
        g = g.sort_values("layer")
        colour, marker = VARIANT_STYLE.get(variant, ("black", "o"))
        yerr = np.nan_to_num(np.vstack([g.value - g.ci_low, g.ci_high - g.value])).clip(min=0)
        ax.errorbar(g.layer + offsets.get(variant, 0.0), g.value, yerr=yerr, marker=marker, capsize=3, color=colour,
                    ls="-", label=VARIANT_LABEL.get(variant, variant))
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(xlabel="layer", ylabel="MMD² image vs text keys", title="Key gap before and after training")
    rep.integer_ticks(ax)
    rep.legend_outside(ax)
    rep.save_figure(fig, path, (
        "Exact MMD² (RBF, median bandwidth of each model's own keys, averaged over KV heads) between image and "
        "text keys of the held-out records, per aligned layer, for the base model, MaLoRA and MaLoRA with its "
        "image branch switched off; 95% intervals clustered by sample. Lower is a smaller modality gap."))
    return True


def eval_html(table: dict[str, dict[str, float]]) -> str:
    """The before/after table with each variant's change against the base model."""
    if not table:
        return ""
    df = pd.DataFrame(table)
    df = df[[not (n.startswith("key_mmd2_ci_")) for n in df.index]]
    if "base" in df:
        for v in [c for c in df.columns if c != "base"]:
            df[f"{v} − base"] = df[v] - df["base"]
    df = df.rename(columns={**VARIANT_LABEL, **{f"{k} − base": f"{v} − base" for k, v in VARIANT_LABEL.items()}})
    return rep.table_html(df.reset_index(names="metric"))


def verdict(metrics: pd.DataFrame, table: dict[str, dict[str, float]]) -> list[str]:
    out = []
    if not metrics.empty:
        first, last = metrics.iloc[0], metrics.iloc[-1]
        out.append(f"Trained {int(last.step)} steps: LM loss {rep.fmt(first['lm'])} → {rep.fmt(last['lm'])}, alignment "
                   f"term {rep.fmt(first['align'])} → {rep.fmt(last['align'])} (first → last logged step).")
    gap = key_gap_table(table)
    if not gap.empty and {"base", "malora"} <= set(gap.variant):
        b = gap[gap.variant == "base"].set_index("layer")
        a = gap[gap.variant == "malora"].set_index("layer").reindex(b.index)
        lower = [int(l) for l in b.index if a.loc[l, "ci_high"] < b.loc[l, "ci_low"]]
        change = (a.value.mean() - b.value.mean()) / abs(b.value.mean()) if b.value.mean() else np.nan
        out.append(f"Key gap (held-out, mean over {len(b)} aligned layers): base {rep.fmt(b.value.mean())} → MaLoRA "
                   f"{rep.fmt(a.value.mean())} (<b>{change:+.0%}</b>); lower with non-overlapping 95% intervals in "
                   f"{len(lower)} of {len(b)} layers.")
    if {"base", "malora"} <= set(table):
        b, a = table["base"], table["malora"]
        parts = []
        if "visual_dependency" in b:
            parts.append(f"visual dependency (ll real − ll blank) {rep.fmt(b['visual_dependency'])} → "
                         f"{rep.fmt(a['visual_dependency'])} nats/token")
        if "lm_loss" in b:
            parts.append(f"held-out LM loss {rep.fmt(b['lm_loss'])} → {rep.fmt(a['lm_loss'])}")
        if "attn_efficiency_image" in b:
            parts.append(f"attention efficiency on image keys {rep.fmt(b['attn_efficiency_image'])} → "
                         f"{rep.fmt(a['attn_efficiency_image'])}")
        if parts:
            out.append("Base model → MaLoRA: " + "; ".join(parts) + ".")
    return out or ["No logged steps and no evaluation table in this folder yet."]


def build_report(run_dir: str | Path) -> Path:
    """(Re)build ``report.html`` (and its pictures) in a train run folder; returns its path."""
    run = Path(run_dir)
    metrics = read_metrics(run)
    table = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    drawn = [p for p, ok in ((run / "train_loss.png", loss_figure(metrics, run / "train_loss.png")),
                             (run / "train_gates.png", gates_figure(metrics, run / "train_gates.png")),
                             (run / "train_key_gap.png", key_gap_figure(table, run / "train_key_gap.png"))) if ok]
    adapter_cfg = run / ADAPTER_DIR / "adapter_config.json"
    split = json.loads((run / SPLIT).read_text()) if (run / SPLIT).exists() else {}
    body = (rep.verdict_html(verdict(metrics, table))
            + f"<p>Run folder <code>{html.escape(run.name)}</code>; {len(split.get('train', []))} training and "
            f"{len(split.get('heldout', []))} held-out records.</p>"
            + "<h2>Pictures</h2>" + rep.figures_html(drawn)
            + "<h2>Before / after on held-out records</h2>" + eval_html(table)
            + "<p class=\"muted\">Rows as documented in kscale/train/evaluate.py; ll_* in nats per answer token.</p>"
            + ("<h2>Adapter</h2><pre>" + html.escape(adapter_cfg.read_text()) + "</pre>" if adapter_cfg.exists() else ""))
    path = run / "report.html"
    path.write_text(rep.page("kscale — MaLoRA training", body))
    return path
