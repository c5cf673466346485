"""Rows of the tidy result table, one function per estimator family.

Every row carries the value, its sampling SE (clustered by sample bucket), the random-feature
approximation SD where there is one, an interval, a p-value where one is defined, the token and
sample counts behind it and a JSON ``conventions`` string saying exactly what was computed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from kscale.analysis import stats
from kscale.analysis.features import FeatureConfig, Sums
from kscale.analysis.jsd import hist_jsd_with_jackknife, to_units
from kscale.analysis.mmd import Side, linear_side, mmd2_from_sums, rf_mmd2, rf_side
from kscale.analysis.plan import Comparison

COLUMNS = ["store", "layer", "head", "comparison", "estimator", "kernel", "normalisation", "bandwidth",
           "multiple", "value", "se", "approx_sd", "ci_low", "ci_high", "p", "p_method", "units",
           "n_tokens", "n_samples", "conventions"]


def row(**kw) -> dict:
    base = {c: None for c in COLUMNS}
    base.update(kw)
    if isinstance(base["conventions"], dict):
        base["conventions"] = json.dumps(base["conventions"], sort_keys=True)
    return base


@dataclass
class Context:
    """What every row of one (store, layer, head) shares."""

    store: str
    layer: int
    head: int
    alpha: float
    n_samples: dict[str, int]  # comparison -> distinct samples behind it


def _sides(sums: dict[str, Sums], comp: Comparison, make) -> tuple[Side, Side]:
    bucket_K = np.arange(len(sums[comp.mod_x].count_K))
    x = make(sums[comp.mod_x]).restrict(comp.mask("x", bucket_K))
    y = make(sums[comp.mod_y]).restrict(comp.mask("y", bucket_K))
    return x, y


def _interval_and_p(x: Side, y: Side, comp: Comparison, value: float, alpha: float):
    bucket_K = np.arange(len(x.n_K))
    nonempty = (x.n_K + y.n_K) > 0
    infl_K = stats.witness_influence(x, y)
    se = stats.cluster_se(infl_K, nonempty)
    lo, hi = stats.t_interval(value, se, int(nonempty.sum()), alpha)
    p, _ = stats.cross_mmd_p(x, y, comp.fold(bucket_K))
    return se, lo, hi, p, infl_K


def rf_rows(ctx: Context, sums: dict[str, Sums], comp: Comparison, configs: list[FeatureConfig],
            bandwidths: dict[str, float], conv: dict) -> tuple[list[dict], dict]:
    """Random-feature MMD^2 rows (one per config); also returns each config's influences."""
    out, influences = [], {}
    for c, fc in enumerate(configs):
        x, y = _sides(sums, comp, lambda s, c=c: rf_side(s.count_K, s.rf_KC2D[:, c]))
        value, approx_sd = rf_mmd2(x, y)
        se, lo, hi, p, infl = _interval_and_p(x, y, comp, value, ctx.alpha)
        influences[(fc.normalisation, fc.kernel, fc.multiple)] = (value, infl, (x.n_K + y.n_K) > 0)
        out.append(row(store=ctx.store, layer=ctx.layer, head=ctx.head, comparison=comp.name,
                       estimator="mmd2_rf", kernel=fc.kernel, normalisation=fc.normalisation,
                       bandwidth=bandwidths[fc.normalisation] * fc.multiple, multiple=fc.multiple,
                       value=value, se=se, approx_sd=approx_sd, ci_low=lo, ci_high=hi, p=p,
                       p_method="cross_mmd_t", units="kernel", n_tokens=int(x.n + y.n),
                       n_samples=ctx.n_samples[comp.name], conventions=conv))
    return out, influences


def linear_rows(ctx: Context, sums: dict[str, Sums], comp: Comparison, norms: list[str],
                conv: dict) -> list[dict]:
    out = []
    for m, how in enumerate(norms):
        x, y = _sides(sums, comp, lambda s, m=m: linear_side(s.count_K, s.lin_KMd[:, m], s.linsq_KM[:, m]))
        value = mmd2_from_sums(x, y)
        se, lo, hi, p, _ = _interval_and_p(x, y, comp, value, ctx.alpha)
        out.append(row(store=ctx.store, layer=ctx.layer, head=ctx.head, comparison=comp.name,
                       estimator="mmd2_linear", kernel="linear", normalisation=how, value=value, se=se,
                       approx_sd=0.0, ci_low=lo, ci_high=hi, p=p, p_method="cross_mmd_t",
                       units="squared key units", n_tokens=int(x.n + y.n),
                       n_samples=ctx.n_samples[comp.name], conventions=conv))
    return out


def permutation_row_update(rows: list[dict], sums: dict[str, Sums], comp: Comparison, buckets_of,
                           n_perm: int, max_units: int, seed: int) -> None:
    """Replace p of the first config's row by a sequence-level permutation p when units are few."""
    if n_perm <= 0 or not sums[comp.mod_x].unit_ids:
        return
    feats, counts, is_x = [], [], []
    for side, mod in (("x", comp.mod_x), ("y", comp.mod_y)):
        ids_U, rf_U2D, count_U = sums[mod].units()
        keep = comp.mask(side, buckets_of(ids_U))
        D = rf_U2D.shape[-1]
        feats.append(rf_U2D[keep].reshape(int(keep.sum()), 2 * D) / np.sqrt(D))
        counts.append(count_U[keep])
        is_x.append(np.full(int(keep.sum()), side == "x"))
    count_U = np.concatenate(counts)
    if len(count_U) > max_units or min(int(is_x[0].sum()), len(is_x[1])) < 2:
        return
    p, _ = stats.permutation_p(np.vstack(feats), count_U, count_U, np.concatenate(is_x), n_perm, seed)
    rows[0]["p"], rows[0]["p_method"] = p, f"sequence_permutation_{n_perm}"


def ratio_rows(ctx: Context, cross: dict, intra: dict, intra_name: str, conv: dict) -> list[dict]:
    """cross / intra ratio of each random-feature config, Fieller interval from joint influences."""
    out = []
    for key, (a, infl_a, ne_a) in cross.items():
        if key not in intra:
            continue
        b, infl_b, ne_b = intra[key]
        nonempty = ne_a | ne_b
        g = int(nonempty.sum())
        var_a = stats.cluster_cov(infl_a, infl_a, nonempty)
        var_b = stats.cluster_cov(infl_b, infl_b, nonempty)
        cov = stats.cluster_cov(infl_a, infl_b, nonempty)
        lo, hi = stats.fieller_interval(a, b, var_a, var_b, cov, ctx.alpha) if g > 1 else (math.nan, math.nan)
        out.append(row(store=ctx.store, layer=ctx.layer, head=ctx.head, comparison=f"cross/{intra_name}",
                       estimator="ratio_mmd2_rf", kernel=key[1], normalisation=key[0], multiple=key[2],
                       value=a / b if b != 0 else math.nan, ci_low=lo, ci_high=hi, units="ratio",
                       n_samples=ctx.n_samples["cross"], conventions=conv))
    return out


def hist_rows(ctx: Context, sums: dict[str, Sums], comp: Comparison, families: dict[str, np.ndarray],
              units: str, conv: dict) -> list[dict]:
    out = []
    x_KPB = sums[comp.mod_x].hist_KPB * comp.mask("x", np.arange(len(sums[comp.mod_x].count_K)))[:, None, None]
    y_KPB = sums[comp.mod_y].hist_KPB * comp.mask("y", np.arange(len(sums[comp.mod_y].count_K)))[:, None, None]
    for fam, cols in families.items():
        if fam.startswith("lda:") and fam != f"lda:{comp.name}":
            continue
        if x_KPB[:, cols].sum() == 0 or y_KPB[:, cols].sum() == 0:
            continue
        value, reps = hist_jsd_with_jackknife(x_KPB, y_KPB, cols)
        _, se = stats.jackknife(value, reps)
        lo, hi = stats.t_interval(value, se, len(reps), ctx.alpha)
        n_tok = int(x_KPB[:, cols[0]].sum() + y_KPB[:, cols[0]].sum())
        out.append(row(store=ctx.store, layer=ctx.layer, head=ctx.head, comparison=comp.name,
                       estimator=f"jsd_hist_{fam.split(':')[0]}", kernel="histogram",
                       value=to_units(value, units), se=to_units(se, units), ci_low=to_units(lo, units),
                       ci_high=to_units(hi, units), units=units, n_tokens=n_tok,
                       n_samples=ctx.n_samples[comp.name],
                       conventions={**conv, "columns": int(len(cols))}))
    return out


def exact_rows(ctx: Context, sub, comp: Comparison, heads: list[int], n_exact: int, norms: list[str],
               kernels: list[str], multiples: list[float], target_plan, conv: dict) -> list[dict]:
    """Exact (blocked, float64) MMD^2_u on matched-size subsamples, same bandwidths as the RF rows."""
    from kscale.analysis.features import normalise
    from kscale.analysis.mmd import exact_mmd2

    x, sx = sub.side(comp, "x", heads, n_exact)
    y, sy = sub.side(comp, "y", heads, n_exact)
    n = min(len(x), len(y))
    x, sx, y, sy = x[:n], sx[:n], y[:n], sy[:n]
    rf_kernels = [k for k in kernels if k != "linear"]
    if n < 4 or not rf_kernels:
        return []
    out = []
    for how in norms:
        bw = target_plan.bandwidth[how]
        pairs = [(k, bw * m) for k in rf_kernels for m in multiples]
        res = exact_mmd2(normalise(x, how, target_plan), normalise(y, how, target_plan), pairs)
        for i, (kernel, b) in enumerate(pairs):
            se, g = stats.clustered_witness_se(res.witness_x_kn[i], sx, res.witness_y_km[i], sy)
            lo, hi = stats.t_interval(float(res.value_k[i]), se, g, ctx.alpha)
            out.append(row(store=ctx.store, layer=ctx.layer, head=ctx.head, comparison=comp.name,
                           estimator="mmd2_exact", kernel=kernel, normalisation=how, bandwidth=b,
                           multiple=b / bw, value=float(res.value_k[i]), se=se, approx_sd=0.0,
                           ci_low=lo, ci_high=hi, units="kernel", n_tokens=2 * n,
                           n_samples=g, conventions=conv))
    return out


def paper_rows(ctx: Context, sub, comp: Comparison, heads: list[int], n_exact: int, paper,
               seed: int) -> list[dict]:
    """Paper-compatible MMD: biased or unbiased, bandwidth rule on the comparison's pooled points,
    RBF kernels at the multiples summed into one kernel; conventions recorded in the row."""
    from kscale.analysis.mmd import exact_mmd2, median_bandwidth

    x, sx = sub.side(comp, "x", heads, n_exact)
    y, sy = sub.side(comp, "y", heads, n_exact)
    n = min(len(x), len(y))
    if n < 4:
        return []
    x, sx, y, sy = x[:n], sx[:n], y[:n], sy[:n]
    bw = median_bandwidth(np.vstack([x, y]), paper.bandwidth_rule, seed=seed)
    pairs = [("rbf", bw * m) for m in paper.multiples]
    res = exact_mmd2(x, y, pairs, biased=paper.estimator == "biased")
    value = float(res.value_k.sum())
    se, g = stats.clustered_witness_se(res.witness_x_kn.sum(0), sx, res.witness_y_km.sum(0), sy)
    lo, hi = stats.t_interval(value, se, g, ctx.alpha)
    conv = {"estimator": paper.estimator, "bandwidth_rule": paper.bandwidth_rule,
            "multiples": list(paper.multiples), "kernel": "sum of rbf exp(-|x-y|^2/2s^2)",
            "normalisation": "none", "n_per_side": n, "matched_sizes": True,
            "note": "biased V-statistic includes k(x,x): its bias ~ (1/n + 1/m)(1 - E k) is in the value"
            if paper.estimator == "biased" else "unbiased U-statistic"}
    return [row(store=ctx.store, layer=ctx.layer, head=ctx.head, comparison=comp.name,
                estimator="mmd2_paper", kernel="rbf_sum", normalisation="none", bandwidth=bw,
                multiple=float(sum(paper.multiples)), value=value, se=se, ci_low=lo, ci_high=hi,
                units="kernel", n_tokens=2 * n, n_samples=g, conventions=conv)]
