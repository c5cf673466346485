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
from kscale.analysis.blas import as_started
from kscale.analysis.features import FeatureConfig, TargetSums
from kscale.analysis.jsd import hist_jsd_with_jackknife, to_units
from kscale.analysis.mmd import (CrossWithin, Side, jackknife_se, linear_side, mmd2_from_sums,
                                 mmd2_leave_one_out, rf_mmd2, rf_side)
from kscale.analysis.plan import Comparison

COLUMNS = ["store", "layer", "head", "comparison", "estimator", "kernel", "normalisation", "bandwidth",
           "multiple", "value", "se", "approx_sd", "ci_low", "ci_high", "p", "p_method", "units",
           "n_tokens", "n_samples", "bandwidth_policy", "conventions"]


def row(**kw) -> dict:
    base = {c: None for c in COLUMNS}
    base.update(kw)
    if isinstance(base["conventions"], dict):
        base["conventions"] = json.dumps(base["conventions"], sort_keys=True)
    return base


@dataclass(frozen=True)
class Context:
    """What every row of one (store, layer, head) shares."""

    store: str
    layer: int
    head: int
    alpha: float
    n_samples: dict[str, int]  # comparison -> distinct samples behind it
    estimator: str  # block | token (mmd.estimator)
    policy: str  # mmd.bandwidth_policy
    seed: int

    def row(self, **kw) -> dict:
        return row(store=self.store, layer=self.layer, head=self.head, **kw)


@dataclass(frozen=True)
class Replicates:
    """An estimate with its delete-one-bucket replicates (for ratios and differences of estimates)."""

    value: float
    loo_K: np.ndarray
    nonempty_K: np.ndarray


def _keep(comp: Comparison, side: str, K: int) -> np.ndarray:
    return comp.mask(side, np.arange(K))


def _sides(ts: TargetSums, comp: Comparison, make) -> tuple[Side, Side]:
    """X and Y restricted to their buckets."""
    K = len(ts.ncross_K)
    x = make(ts.by_mod[comp.mod_x]).restrict(_keep(comp, "x", K))
    y = make(ts.by_mod[comp.mod_y]).restrict(_keep(comp, "y", K))
    return x, y


def _rf_make(c: int):
    return lambda s: rf_side(s.count_K, s.rf_KC2D[:, c], s.rfself_KCD[:, c], s.nsq_K)


def _lin_make(m: int):
    return lambda s: linear_side(s.count_K, s.lin_KMd[:, m], s.linsq_KM[:, m], s.linself_KM[:, m], s.nsq_K)


def _cross_within(ts: TargetSums, comp: Comparison, within_KG: np.ndarray) -> CrossWithin | None:
    return CrossWithin(within_KG, ts.ncross_K) if comp.mod_x != comp.mod_y else None


def _row_stats(ctx: Context, x: Side, y: Side, xy: CrossWithin | None, comp: Comparison, value: float,
               ) -> tuple[dict, Replicates]:
    nonempty = (x.n_K + y.n_K) > 0
    loo = mmd2_leave_one_out(x, y, xy, ctx.estimator)
    se = jackknife_se(loo, nonempty)
    lo, hi = stats.t_interval(value, se, int(nonempty.sum()), ctx.alpha)
    p, _ = stats.cross_mmd_p(x, y, comp.fold(np.arange(len(x.n_K))))
    return dict(value=value, se=se, ci_low=lo, ci_high=hi, p=p, p_method="cross_mmd_t",
                n_tokens=int(x.n + y.n), n_samples=ctx.n_samples[comp.name],
                bandwidth_policy=ctx.policy), Replicates(value, loo, nonempty)


def rf_rows(ctx: Context, ts: TargetSums, comp: Comparison, configs: list[FeatureConfig],
            bandwidths: dict[str, float], conv: dict) -> tuple[list[dict], dict]:
    """Random-feature MMD^2 rows (one per config); also each config's jackknife replicates."""
    out, reps = [], {}
    for c, fc in enumerate(configs):
        x, y = _sides(ts, comp, _rf_make(c))
        xy = _cross_within(ts, comp, ts.rfcross_KCD[:, c])
        value, approx_sd = rf_mmd2(x, y, xy, ctx.estimator)
        fields, reps[(fc.normalisation, fc.kernel, fc.multiple)] = _row_stats(ctx, x, y, xy, comp, value)
        out.append(ctx.row(comparison=comp.name, estimator="mmd2_rf", kernel=fc.kernel,
                           normalisation=fc.normalisation, bandwidth=bandwidths[fc.normalisation] * fc.multiple,
                           multiple=fc.multiple, approx_sd=approx_sd, units="kernel", conventions=conv, **fields))
    return out, reps


def linear_rows(ctx: Context, ts: TargetSums, comp: Comparison, norms: list[str], conv: dict) -> list[dict]:
    out = []
    for m, how in enumerate(norms):
        x, y = _sides(ts, comp, _lin_make(m))
        xy = _cross_within(ts, comp, ts.lincross_KM[:, m:m + 1])
        fields, _ = _row_stats(ctx, x, y, xy, comp, mmd2_from_sums(x, y, xy, ctx.estimator))
        out.append(ctx.row(comparison=comp.name, estimator="mmd2_linear", kernel="linear", normalisation=how,
                           approx_sd=0.0, units="squared key units", conventions=conv, **fields))
    return out


SKIPPED = ("cross-MMD one-sided t (valid at any size): sequence permutations skipped, more (sample, modality) "
           "sequences than significance.max_permutation_units")


def permutation_row_update(ctx: Context, rows: list[dict], ts: TargetSums, comp: Comparison, buckets,
                           n_perm: int) -> None:
    """Replace p of the first config's row by a sequence-level permutation p when units are few.

    Above ``significance.max_permutation_units`` the per-sequence sums were not kept (``features.Sums``):
    the row keeps its cross-MMD p (``p_method`` ``cross_mmd_t``) and its ``conventions`` say why."""
    if n_perm <= 0:
        return
    if any(ts.by_mod[m].units_dropped or not ts.by_mod[m].unit_ids for m in (comp.mod_x, comp.mod_y)):
        conv = json.loads(rows[0]["conventions"])
        rows[0]["conventions"] = json.dumps({**conv, "p": SKIPPED}, sort_keys=True)
        return
    feats, counts, is_x = [], [], []
    for side, mod in (("x", comp.mod_x), ("y", comp.mod_y)):
        ids_U, rf_U2D, count_U = ts.by_mod[mod].units()
        keep = comp.mask(side, buckets.of(ids_U))
        D = rf_U2D.shape[-1]
        feats.append(rf_U2D[keep].reshape(int(keep.sum()), 2 * D) / np.sqrt(D))
        counts.append(count_U[keep])
        is_x.append(np.full(int(keep.sum()), side == "x"))
    count_U, feat_UF = np.concatenate(counts), np.vstack(feats)
    if min(int(is_x[0].sum()), len(is_x[1])) < 2:
        return
    block = ctx.estimator == "block"
    sq_U = (feat_UF**2).sum(1) if block else count_U
    p, _ = stats.permutation_p(feat_UF, count_U, sq_U, np.concatenate(is_x), n_perm, ctx.seed,
                               pairs_U=count_U**2 if block else None)
    rows[0]["p"], rows[0]["p_method"] = p, f"sequence_permutation_{n_perm}"


def _fieller(a: Replicates, b: Replicates, alpha: float) -> tuple[float, float]:
    nonempty = a.nonempty_K | b.nonempty_K
    if int(nonempty.sum()) < 2:
        return math.nan, math.nan
    var_a = stats.jackknife_cov(a.loo_K, a.loo_K, nonempty)
    var_b = stats.jackknife_cov(b.loo_K, b.loo_K, nonempty)
    cov = stats.jackknife_cov(a.loo_K, b.loo_K, nonempty)
    return stats.fieller_interval(a.value, b.value, var_a, var_b, cov, alpha)


RATIO_P = ("the cross row's p (same kernel): the intra halves are a random split of one modality by sample hash, "
           "so the population intra MMD^2 is 0 and H0 'cross <= intra' is the cross row's H0 'cross = 0'")
CROSS_ROW = "cross_row_"  # p_method prefix of rows whose p is the cross row's (verdict.p_test)


def _cross_p(cross_row: dict | None) -> dict:
    """``p`` / ``p_method`` of a ratio row from its cross row (nothing when there is none)."""
    if cross_row is None or cross_row.get("p_method") is None:
        return {}
    return {"p": cross_row["p"], "p_method": CROSS_ROW + cross_row["p_method"]}


def ratio_rows(ctx: Context, cross: dict, intra: dict, intra_name: str, conv: dict,
               cross_rows: dict | None = None) -> list[dict]:
    """cross / intra ratio of each random-feature config, Fieller interval from joint replicates; the p-value
    is the cross row's of the same config (``cross_rows``: config key -> row; :data:`RATIO_P` says why)."""
    out = []
    for key, a in cross.items():
        if key not in intra:
            continue
        b = intra[key]
        lo, hi = _fieller(a, b, ctx.alpha)
        out.append(ctx.row(comparison=f"cross/{intra_name}", estimator="ratio_mmd2_rf", kernel=key[1],
                           normalisation=key[0], multiple=key[2],
                           value=a.value / b.value if b.value != 0 else math.nan, ci_low=lo, ci_high=hi,
                           units="ratio", n_samples=ctx.n_samples["cross"], bandwidth_policy=ctx.policy,
                           conventions={**conv, "p": RATIO_P} if cross_rows else conv,
                           **_cross_p((cross_rows or {}).get(key))))
    return out


def gap_row(ctx: Context, cross: Replicates, intras: list[Replicates], key: tuple, conv: dict,
            cross_row: dict | None = None) -> list[dict]:
    """The headline: cross MMD^2 over the mean intra-modal MMD^2 (the noise floor) of the primary kernel,
    with a Fieller interval from joint replicates; unbounded when the floor is indistinguishable from 0. Its
    p-value is the primary cross row's (``cross_row``; :data:`RATIO_P`)."""
    if not intras:
        return []
    mean = Replicates(float(np.mean([r.value for r in intras])), np.mean([r.loo_K for r in intras], axis=0),
                      np.any([r.nonempty_K for r in intras], axis=0))
    lo, hi = _fieller(cross, mean, ctx.alpha)
    conv = {**conv, "intra": len(intras), **({"p": RATIO_P} if cross_row else {})}
    return [ctx.row(comparison="cross/intra", estimator="gap_normalised", kernel=key[1], normalisation=key[0],
                    multiple=key[2], value=cross.value / mean.value if mean.value != 0 else math.nan,
                    ci_low=lo, ci_high=hi, units="ratio", n_samples=ctx.n_samples["cross"],
                    bandwidth_policy=ctx.policy, conventions=conv, **_cross_p(cross_row))]


def hist_sides(ts: TargetSums, comp: Comparison) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket histograms (K, P, B) of the comparison's two sides, each restricted to its buckets."""
    K = len(ts.ncross_K)
    return (ts.by_mod[comp.mod_x].hist_KPB * _keep(comp, "x", K)[:, None, None],
            ts.by_mod[comp.mod_y].hist_KPB * _keep(comp, "y", K)[:, None, None])


def hist_rows(ctx: Context, ts: TargetSums, comp: Comparison, families: dict[str, np.ndarray],
              units: str, conv: dict) -> list[dict]:
    out = []
    x_KPB, y_KPB = hist_sides(ts, comp)
    for fam, cols in families.items():
        if fam.startswith("lda:") and fam != f"lda:{comp.name}":
            continue
        if x_KPB[:, cols].sum() == 0 or y_KPB[:, cols].sum() == 0:
            continue
        value, reps = hist_jsd_with_jackknife(x_KPB, y_KPB, cols)
        _, se = stats.jackknife(value, reps)
        lo, hi = stats.t_interval(value, se, len(reps), ctx.alpha)
        n_tok = int(x_KPB[:, cols[0]].sum() + y_KPB[:, cols[0]].sum())
        test = hist_p(x_KPB, y_KPB, cols, comp, fam)
        out.append(ctx.row(comparison=comp.name, estimator=f"jsd_hist_{fam.split(':')[0]}", kernel="histogram",
                       value=to_units(value, units), se=to_units(se, units), ci_low=to_units(lo, units),
                       ci_high=to_units(hi, units), units=units, n_tokens=n_tok, n_samples=ctx.n_samples[comp.name],
                       conventions={**conv, "columns": int(len(cols)), "p": test.pop("why")}, **test))
    return out


HIST_P = ("cross-fit t of the bin frequencies (witness: fold-0 bin frequency differences of every column, its "
          "mean gap over the fold-1 buckets studentised): H0 equal histograms of the views, i.e. JSD 0")
LDA_P = ("none: the Fisher direction is fitted to separate these sides on the subsample, whose tokens the test "
         "folds contain, so a test along it would not hold its level")


def hist_p(x_KPB: np.ndarray, y_KPB: np.ndarray, cols: np.ndarray, comp: Comparison, fam: str) -> dict:
    """p of a histogram JSD row: the cross-MMD t-test (:func:`stats.cross_mmd_p`) with the bin indicators of
    the row's columns as features (a token adds 1 to one bin per column), i.e. the cross-fit test of the
    kernel k(a, b) = #columns where a and b share a bin, whose MMD is 0 exactly when every column's
    histogram is equal on both sides (the JSD row's null). Per-bucket counts are all it reads, at any size.
    Not for the LDA family (:data:`LDA_P`)."""
    if fam.startswith("lda"):
        return {"p": None, "p_method": "none_fitted_direction", "why": LDA_P}
    K = len(x_KPB)

    def side(h_KPB):
        feat_KGF = np.asarray(h_KPB[:, cols], np.float64)
        zero_KG = np.zeros(feat_KGF.shape[:2])
        return Side(feat_KGF[:, 0].sum(-1), feat_KGF, zero_KG, zero_KG, np.zeros(K))

    p, _ = stats.cross_mmd_p(side(x_KPB), side(y_KPB), comp.fold(np.arange(K)))
    return {"p": p, "p_method": "cross_hist_t", "why": HIST_P}


def _matched(sub, comp: Comparison, heads: list[int], n_exact: int, seed: int):
    """Matched-size subsample sides: (x, ids_x, buckets_x), (y, ids_y, buckets_y) or None when too few."""
    x = sub.side(comp, "x", heads, n_exact, seed)
    y = sub.side(comp, "y", heads, n_exact, seed)
    n = min(len(x[0]), len(y[0]))
    if n < 4:
        return None
    return tuple(a[:n] for a in x), tuple(a[:n] for a in y)


def exact_rows(ctx: Context, sub, comp: Comparison, heads: list[int], cfg, target_plan, conv: dict,
               ) -> list[dict]:
    """Exact (blocked, float64) MMD^2 on matched-size subsamples, same estimator form and bandwidths as
    the random-feature rows, jackknife SE over the same buckets."""
    from kscale.analysis.features import normalise
    from kscale.analysis.mmd import exact_parts

    sides = _matched(sub, comp, heads, cfg.exact_subsample, ctx.seed)
    rf_kernels = [k for k in cfg.mmd.kernels if k != "linear"]
    if sides is None or not rf_kernels:
        return []
    (x, ix, bx), (y, iy, by) = sides
    out = []
    for how in cfg.mmd.normalisations:
        bw = target_plan.bandwidth[how]
        pairs = [(k, bw * m) for k in rf_kernels for m in cfg.mmd.bandwidth_multiples]
        with as_started():  # the distance blocks' bits depend on BLAS's thread count (analysis/blas.py)
            res = exact_parts(normalise(x, how, target_plan), normalise(y, how, target_plan), pairs, ids_x=ix,
                              ids_y=iy, bucket_x=bx, bucket_y=by, n_buckets=cfg.significance.n_buckets,
                              estimator=ctx.estimator)
        g = int(res.nonempty_K.sum())
        fold_K = comp.fold(np.arange(cfg.significance.n_buckets))
        for i, (kernel, b) in enumerate(pairs):
            value = float(res.value_k[i])
            se = jackknife_se(res.loo_kK[i], res.nonempty_K)
            lo, hi = stats.t_interval(value, se, g, ctx.alpha)
            bp = res.pairs
            p, _ = stats.bucket_pair_p(bp.xx_kKK[i], bp.xy_kKK[i], bp.yy_kKK[i], bp.nx_K, bp.ny_K, fold_K)
            out.append(ctx.row(comparison=comp.name, estimator="mmd2_exact", kernel=kernel, normalisation=how,
                               bandwidth=b, multiple=b / bw, value=value, se=se, approx_sd=0.0, ci_low=lo,
                               ci_high=hi, p=p, p_method="cross_kernel_t", units="kernel", n_tokens=2 * len(x),
                               n_samples=len(np.union1d(ix, iy)), bandwidth_policy=ctx.policy,
                               conventions={**conv, "p": EXACT_P}))
    return out


EXACT_P = ("cross-fit t of the exact kernel on the subsample: witness = kernel mean embedding gap of the fold-0 "
           "points, its mean gap over the fold-1 buckets studentised (pairs across folds only)")


def paper_rows(ctx: Context, sub, comp: Comparison, heads: list[int], n_exact: int, paper) -> list[dict]:
    """Paper-compatible MMD: biased or unbiased, bandwidth rule on the comparison's pooled points,
    RBF kernels at the multiples summed into one kernel; conventions recorded in the row."""
    from kscale.analysis.mmd import exact_mmd2, median_bandwidth

    sides = _matched(sub, comp, heads, n_exact, ctx.seed)
    if sides is None:
        return []
    (x, sx, bx), (y, sy, by) = sides
    with as_started():  # as in exact_rows: BLAS's thread count changes distance bits (analysis/blas.py)
        bw = median_bandwidth(np.vstack([x, y]), paper.bandwidth_rule, seed=ctx.seed)
        pairs = [("rbf", bw * m) for m in paper.multiples]
        K = int(max(bx.max(), by.max())) + 1
        res = exact_mmd2(x, y, pairs, biased=paper.estimator == "biased", bucket_x=bx, bucket_y=by, n_buckets=K)
    value = float(res.value_k.sum())
    se, g = stats.clustered_witness_se(res.witness_x_kn.sum(0), sx, res.witness_y_km.sum(0), sy)
    lo, hi = stats.t_interval(value, se, g, ctx.alpha)
    bp = res.pairs.summed()
    p, _ = stats.bucket_pair_p(bp.xx_kKK[0], bp.xy_kKK[0], bp.yy_kKK[0], bp.nx_K, bp.ny_K, comp.fold(np.arange(K)))
    conv = {"estimator": paper.estimator, "bandwidth_rule": paper.bandwidth_rule,
            "multiples": list(paper.multiples), "kernel": "sum of rbf exp(-|x-y|^2/2s^2)",
            "normalisation": "none", "n_per_side": len(x), "matched_sizes": True, "pairs": "token-level",
            "note": "biased V-statistic includes k(x,x): its bias ~ (1/n + 1/m)(1 - E k) is in the value"
            if paper.estimator == "biased" else "unbiased U-statistic", "p": EXACT_P}
    return [ctx.row(comparison=comp.name, estimator="mmd2_paper", kernel="rbf_sum", normalisation="none",
                    bandwidth=bw, multiple=float(sum(paper.multiples)), value=value, se=se, ci_low=lo,
                    ci_high=hi, p=p, p_method="cross_kernel_t", units="kernel", n_tokens=2 * len(x), n_samples=g,
                    bandwidth_policy=paper.bandwidth_rule, conventions=conv)]
