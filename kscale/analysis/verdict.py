"""From the tidy result table to what a reader needs first: which layers show a significant gap, how
large it is against the noise floor, and whether that holds across kernels, normalisations and
bandwidths. Pure pandas; :mod:`kscale.analysis.report` draws and writes what this computes.

Definitions (also printed on the report page, :data:`DEFINITIONS`):

- a **setting** is one (estimator, kernel, normalisation, bandwidth multiple) — plus
  ``bandwidth_policy`` / ``statistic`` when the table has those columns;
- the **noise floor** of a (layer, head) is the upper end of the intra-modal baselines' intervals,
  ``max(ci_high)`` over ``intra_text`` and ``intra_image`` (what splitting one modality in two still
  shows), floored at a tiny positive number;
- **gap over noise** = cross-modal value / noise floor;
- a layer's gap is **significant** when the cross-modal p-value, Holm-corrected over the layers (or
  over the layer × head cells) of the setting, is below alpha **and** the cross-modal interval lies
  above the noise floor. Rows without a p-value use the interval alone;
- every layer's p-value is shown with the **test** that gave it (``p_method``, :func:`p_test`): a
  sequence permutation test for small runs, the cross-MMD t-test above
  ``significance.max_permutation_units``, or "none (interval alone)" — never a silent blank.

Columns used: store, layer, head, comparison, estimator, kernel, normalisation, multiple, value,
ci_low, ci_high, p (``rows.COLUMNS``), and ``p_method`` where present. Extra columns are carried when
present: ``bandwidth_policy``, ``statistic`` (setting keys), ratio / normalised-gap rows (``comparison``
like ``cross/intra_text``, ``estimator`` starting with ``ratio_`` or ``gap_``), which the page shows beside the layer table.
"""

from __future__ import annotations

import functools
import hashlib
import html
import inspect
import json
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kscale.reporting import fmt

INTRA = ("intra_text", "intra_image")
SETTING_KEYS = ("estimator", "kernel", "normalisation", "multiple", "bandwidth_policy", "statistic")
GAP_ESTIMATORS = ("mmd2_rf", "mmd2_exact", "mmd2_linear")
NOISE_EPS = 1e-12
AGREE = 0.8  # share of layers on which a setting must agree with the primary one for "holds"
POOLED = -1
NORMALISATION_LABEL = {"none": "raw keys", "l2": "unit-norm keys", "standardize": "standardised keys"}

DEFINITIONS = (
    "<b>Noise floor</b>: the upper end of the intra-modal baselines' intervals (text split in two, image "
    "split in two, by sample). <b>Gap over noise</b>: cross-modal value / noise floor. <b>Significant</b>: "
    "the cross-modal p-value, Holm-corrected over the layers shown, is below alpha and the cross-modal "
    "interval lies above the noise floor (rows without a p-value: the interval alone). A setting "
    "<b>holds</b> when it agrees with the primary setting on at least 80% of the layers.")


@dataclass(frozen=True)
class Setting:
    """One estimator configuration, as a dict of the setting keys the table has."""

    keys: tuple[tuple[str, object], ...]

    def get(self, name: str, default=None):
        return dict(self.keys).get(name, default)

    def select(self, df: pd.DataFrame) -> pd.DataFrame:
        mask = np.ones(len(df), bool)
        for k, v in self.keys:
            col = df[k]
            mask &= col.isna().to_numpy() if _missing(v) else (col == v).to_numpy()
        return df[mask]

    def label(self) -> str:
        d = dict(self.keys)
        est = {"mmd2_rf": "RF", "mmd2_exact": "exact", "mmd2_linear": "linear"}.get(d.get("estimator"),
                                                                                 d.get("estimator"))
        parts = [str(est)]
        if d.get("estimator") != "mmd2_linear":
            parts.append(str(d.get("kernel")))
        parts.append(NORMALISATION_LABEL.get(d.get("normalisation"), f"{d.get('normalisation')} keys"))
        if not _missing(d.get("multiple")) and d.get("estimator") != "mmd2_linear":
            parts.append(f"{float(d['multiple']):g}x bw")
        for extra in ("bandwidth_policy", "statistic"):
            if not _missing(d.get(extra)):
                parts.append(str(d[extra]))
        return ", ".join(parts)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def setting_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in SETTING_KEYS if k in df.columns]


def settings(df: pd.DataFrame) -> list[Setting]:
    """Every gap setting in the table (cross rows of MMD estimators), the primary one first."""
    keys = setting_keys(df)
    sel = df[df.estimator.isin(GAP_ESTIMATORS) & (df.comparison == "cross")]
    combos = sel[keys].drop_duplicates()
    out = [Setting(tuple((k, r[k]) for k in keys)) for _, r in combos.iterrows()]
    primary = primary_setting(df)
    return sorted(out, key=lambda s: (s != primary, _rank(s)))


def _rank(s: Setting) -> tuple:
    est = GAP_ESTIMATORS.index(s.get("estimator")) if s.get("estimator") in GAP_ESTIMATORS else 9
    m = s.get("multiple")
    return (est, str(s.get("kernel")), str(s.get("normalisation")),
            99.0 if _missing(m) else abs(math.log(float(m))), str(s.get("bandwidth_policy", "")))


def primary_setting(df: pd.DataFrame) -> Setting | None:
    """RF MMD² (else exact), RBF, raw keys, the bandwidth multiple closest to 1 (and, when the table
    records them, a sample-/block-level statistic if there is one, else the most common value, and the
    most common bandwidth policy)."""
    keys = setting_keys(df)
    for est in ("mmd2_rf", "mmd2_exact"):
        sel = df[(df.estimator == est) & (df.comparison == "cross")]
        if sel.empty:
            continue
        for col, want in (("kernel", "rbf"), ("normalisation", "none")):
            if (sel[col] == want).any():
                sel = sel[sel[col] == want]
        mult = sel.multiple.astype(float)
        sel = sel[mult == mult.iloc[np.abs(np.log(mult.to_numpy())).argmin()]]
        for extra in ("bandwidth_policy", "statistic"):
            if extra in keys and sel[extra].notna().any():
                values = sel[extra].dropna()
                dependence_aware = [v for v in values.unique() if any(w in str(v) for w in ("sample", "block"))]
                sel = sel[sel[extra] == (dependence_aware[0] if dependence_aware else values.mode().iloc[0])]
        first = sel.iloc[0]
        return Setting(tuple((k, first[k]) for k in keys))
    return None


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN stays NaN)."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok])]
    m = len(order)
    adj = np.maximum.accumulate([(m - i) * p[j] for i, j in enumerate(order)])
    out[order] = np.minimum(adj, 1.0)
    return out


_MEMO: OrderedDict = OrderedDict()  # (function, table fingerprint, arguments) -> result
_MEMO_SIZE = 512


def fingerprint(df: pd.DataFrame) -> tuple:
    """The table's content as a key: column names, dtypes and a hash of every value and the index (about 2 ms
    for the demo's 1,050 rows), so a result is reused only for a table equal to the one it came from."""
    values = pd.util.hash_pandas_object(df, index=True).to_numpy()
    return tuple(df.columns), tuple(map(str, df.dtypes)), hashlib.blake2b(values.tobytes(), digest_size=16).digest()


def _memo(fn):
    """Reuse ``fn(df, ...)`` for an equal table and equal arguments; every caller gets its own copy. The
    figures, the layer table and the verdict all ask for the same gap tables (about 40 settings, three
    times): computed once, not three times."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(df: pd.DataFrame, *args, **kwargs):
        try:
            bound = signature.bind(df, *args, **kwargs)
            bound.apply_defaults()  # gap_table(df, s) and gap_table(df, s, "pooled", 0.05) are one call
            key = (fn.__name__, fingerprint(df), tuple(bound.arguments.items())[1:])
            hash(key)
        except TypeError:  # an unhashable argument or value: compute
            return fn(df, *args, **kwargs)
        if key not in _MEMO:
            _MEMO[key] = fn(df, *args, **kwargs)
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
        _MEMO.move_to_end(key)
        return _MEMO[key].copy()

    return wrapper


GAP_COLUMNS = ("store", "layer", "head", "comparison", "value", "ci_low", "ci_high", "p", "p_method")


@_memo
def gap_table(df: pd.DataFrame, setting: Setting, heads: str = "pooled", alpha: float = 0.05) -> pd.DataFrame:
    """One row per (store, layer, head): cross and intra values, noise floor, gap over noise, significance.

    ``heads``: ``"pooled"`` (head -1; the lowest head when no row pools heads) or ``"each"`` (every
    head >= 0; Holm over all layer × head cells of a store).
    """
    used = [c for c in df.columns if c in GAP_COLUMNS or c in dict(setting.keys)]
    sel = setting.select(df[used])  # the columns it reads: every later step copies fewer (the long JSON strings not)
    pooled = (sel["head"] == POOLED).any()
    if heads == "pooled":
        sel = sel[sel["head"] == (POOLED if pooled else sel["head"].min())]
    else:
        sel = sel[sel["head"] >= 0]
    if sel.empty:
        return pd.DataFrame()
    wide = sel[sel.comparison.isin(("cross",) + INTRA)].pivot_table(
        index=["store", "layer", "head"], columns="comparison", values=["value", "ci_low", "ci_high", "p"],
        aggfunc="first", dropna=False)
    out = pd.DataFrame(index=wide.index)
    for comp in ("cross",) + INTRA:
        for stat in ("value", "ci_low", "ci_high", "p"):
            out[f"{comp}_{stat}" if stat != "value" else comp] = \
                wide[(stat, comp)].astype(float) if (stat, comp) in wide.columns else np.nan
    out = out.reset_index()
    intra_hi = out[[f"{c}_ci_high" for c in INTRA]].max(axis=1, skipna=True)
    out["noise_floor"] = intra_hi.clip(lower=NOISE_EPS)
    out["gap_over_noise"] = out["cross"] / out["noise_floor"]
    out["p_holm"] = np.nan
    for _, idx in out.groupby("store").groups.items():
        out.loc[idx, "p_holm"] = holm(out.loc[idx, "cross_p"].to_numpy())
    out["p_method"] = _cross_p_methods(sel, out)
    above = out["cross_ci_low"] > out["noise_floor"]
    has_p = out["p_holm"].notna()
    out["significant"] = above & (~has_p | (out["p_holm"] < alpha))
    return out.sort_values(["store", "head", "layer"]).reset_index(drop=True)


def _cross_p_methods(sel: pd.DataFrame, out: pd.DataFrame) -> np.ndarray:
    """The ``p_method`` of each cross row behind ``out`` (None where the table has no such column)."""
    if "p_method" not in sel.columns:
        return np.full(len(out), None, dtype=object)
    cross = sel[sel.comparison == "cross"].drop_duplicates(["store", "layer", "head"])
    methods = cross.set_index(["store", "layer", "head"])["p_method"]
    return methods.reindex(pd.MultiIndex.from_frame(out[["store", "layer", "head"]])).to_numpy(dtype=object)


def p_test(method, p: float) -> str:
    """The name of the test behind a p-value, in words (``rows.COLUMNS`` ``p_method``); rows without a
    p-value say so instead of showing a blank."""
    method = None if _missing(method) else str(method)
    if method is None and not np.isfinite(p):
        return "none (interval alone)"
    if method is None:
        return "unnamed test"
    if method.startswith("cross_row_"):  # ratio rows: the cross row's test (rows.RATIO_P)
        return "cross row's " + p_test(method[len("cross_row_"):], p)
    if method.startswith("none_"):
        return P_TESTS.get(method, "none")
    if method.startswith("sequence_permutation_"):
        name = f"sequence permutation ({method.rsplit('_', 1)[-1]})"
    else:
        name = P_TESTS.get(method, method)
    return name if np.isfinite(p) else f"{name}: undefined here"


P_TESTS = {"cross_mmd_t": "cross-MMD t", "cross_kernel_t": "cross-fit t (exact kernel)",
           "cross_hist_t": "cross-fit t (bin frequencies)", "heldout_t": "held-out t",
           "none_fitted_direction": "none (direction fitted on these tokens)"}
P_TEST_SENTENCE = {
    "sequence permutation": "a permutation test that reassigns whole samples' sequences between the sides",
    "cross-MMD t": "the cross-MMD t-test (witness from one half of the sample buckets, its mean gap studentised "
                   "over the other half: valid at any number of samples, no permutations)",
    "cross-fit t (exact kernel)": "the cross-fit t-test of the exact kernel on the subsample (witness from the "
                                  "fold-0 buckets' points, its mean gap studentised over the fold-1 buckets)",
    "none": "none: these rows have no p-value, so the interval alone decides"}


def p_tests(df: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One line per (estimator, comparison, test): the test in words (:func:`p_test`), rows, rows with a p-value
    and rows with p < alpha."""
    if df.empty or "p_method" not in df.columns:
        return pd.DataFrame()
    p = pd.to_numeric(df["p"], errors="coerce").to_numpy(float)
    t = pd.DataFrame({"estimator": df.estimator, "comparison": df.comparison,
                      "p test": [p_test(m, v).split(":")[0] for m, v in zip(df.p_method, p)],
                      "has_p": np.isfinite(p), "below": np.isfinite(p) & (p < alpha)})
    g = t.groupby(["estimator", "comparison", "p test"], sort=True)
    return pd.DataFrame({"rows": g.size(), "with p": g.has_p.sum(), f"p < {alpha:g}": g.below.sum()}).reset_index()


def p_sentence(g: pd.DataFrame, alpha: float) -> str:
    """Which test gave the p-values of a store's layers, and whether Holm can reach alpha with them."""
    labels = [p_test(m, p) for m, p in zip(g.p_method, g.cross_p)]
    parts = []
    for label in dict.fromkeys(labels):
        layers = [int(l) for l, x in zip(g.layer, labels) if x == label]
        key = next((k for k in P_TEST_SENTENCE if label.startswith(k)), None)
        what = f"{html.escape(label)}, {P_TEST_SENTENCE[key]}" if key else html.escape(label)
        parts.append(f"{what} (layers {ranges(layers)})")
    out = "p-values: " + "; ".join(parts) + "."
    perm = [str(m) for m in g.p_method if not _missing(m) and str(m).startswith("sequence_permutation_")]
    if perm:
        n_perm = min(int(m.rsplit("_", 1)[-1]) for m in perm)
        floor = len(g) / (1 + n_perm)  # Holm over the layers of the smallest possible permutation p
        if floor >= alpha:
            out += (f" With {n_perm} permutations the smallest p is 1/{n_perm + 1}, which Holm over {len(g)} "
                    f"layers lifts to {fmt(floor, 2)} ≥ alpha: <b>no layer can be significant</b>; raise "
                    "significance.permutations.")
    return out


def feature_count_sentence(df: pd.DataFrame, primary: Setting) -> list[str]:
    """The random-feature rule (docs/analysis.md): where a cross row's approximation error ``approx_sd``
    exceeds its sampling error ``se``, D should grow to D · (approx_sd / se)^2 (D in proportion to the
    samples) for the test to keep the exact kernel test's power."""
    if primary.get("estimator") != "mmd2_rf" or not {"approx_sd", "se", "conventions"} <= set(df.columns):
        return []
    sel = primary.select(df)
    sel = sel[(sel.comparison == "cross") & (sel["head"] == (POOLED if (sel["head"] == POOLED).any()
                                                               else sel["head"].min()))]
    ratio = sel.approx_sd.astype(float) / sel.se.astype(float)
    over = sel[ratio > 1]
    if over.empty:
        return []
    conv = over.conventions.iloc[0]
    d_now = json.loads(conv).get("D") if isinstance(conv, str) else None
    if d_now is None:
        return []
    need = int(math.ceil(d_now * float(ratio[ratio > 1].max()) ** 2))
    where = ranges(sorted(set(over.layer.tolist())))
    return [f"In {len(over)} of {len(sel)} layers ({where}) the random-feature error of the "
            f"cross-modal value exceeds its sampling error (approx_sd/se up to {fmt(float(ratio.max()), 2)}): the "
            f"p-values stay valid, but the test sees the kernel only through D = {d_now} frequencies; for the full "
            f"kernel's power use mmd.n_features ≥ {need} (D · (approx_sd/se)², docs/analysis.md)."]


def ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0–2, 5, 7–8"."""
    if not layers:
        return "none"
    layers = sorted(int(x) for x in layers)
    parts, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


@_memo
def sensitivity(df: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per setting and store: layers, significant layers, median gap over noise, agreement with the primary."""
    primary = primary_setting(df)
    if primary is None:
        return pd.DataFrame()
    base = gap_table(df, primary, "pooled", alpha).set_index(["store", "layer"])["significant"]
    rows = []
    for s in settings(df):
        t = gap_table(df, s, "pooled", alpha)
        if t.empty:
            continue
        for store, g in t.groupby("store"):
            sig = g.set_index(["store", "layer"])["significant"]
            common = sig.index.intersection(base.index)
            agree = float((sig.loc[common] == base.loc[common]).mean()) if len(common) else np.nan
            rows.append({"setting": s.label(), "store": store, "primary": s == primary,
                         **{k: v for k, v in s.keys}, "layers": len(g), "significant_layers": int(g.significant.sum()),
                         "median_gap_over_noise": float(np.nanmedian(g.gap_over_noise)),
                         "median_cross": float(np.nanmedian(g.cross)), "agreement": agree,
                         "holds": bool(agree >= AGREE) if np.isfinite(agree) else False})
    return pd.DataFrame(rows)


def short_store(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def verdict(df: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """The verdict paragraph, one HTML-safe sentence group per item."""
    primary = primary_setting(df)
    if primary is None:
        return ["No cross-modal MMD rows in this table: nothing to conclude about a key gap."]
    out = []
    t = gap_table(df, primary, "pooled", alpha)
    pooled = (primary.select(df)["head"] == POOLED).any()
    several = t.store.nunique() > 1
    for store, g in t.groupby("store", sort=False):
        sig = g[g.significant]
        who = f"In {html.escape(short_store(store))}, at" if several else "At"
        first = (f"{who} the primary setting ({html.escape(primary.label())}, "
                 f"{'KV heads pooled' if pooled else 'KV head ' + str(int(g['head'].iloc[0]))}) the image–text "
                 f"key gap is <b>significant in {len(sig)} of {len(g)} layers</b> ({ranges(sig.layer.tolist())}).")
        if len(sig):
            lo, hi = sig.gap_over_noise.min(), sig.gap_over_noise.max()
            best = sig.loc[sig.cross.idxmax()]
            first += (f" There the cross-modal MMD² is {fmt(sig.cross.min())}–{fmt(sig.cross.max())} (largest at "
                      f"layer {int(best.layer)}), <b>{fmt(lo, 2)}–{fmt(hi, 2)}× the noise floor</b> "
                      f"(at most {fmt(sig.noise_floor.max())}).")
        not_sig = g[~g.significant]
        if len(not_sig):
            first += (f" Not significant: layers {ranges(not_sig.layer.tolist())} (cross/noise "
                      f"{fmt(not_sig.gap_over_noise.min(), 2)}–{fmt(not_sig.gap_over_noise.max(), 2)}).")
        first += " " + p_sentence(g, alpha)
        out.append(first)
    out += feature_count_sentence(df, primary)
    heads = gap_table(df, primary, "each", alpha)
    if not heads.empty and heads["head"].nunique() > 1:
        out.append(f"Per KV head: significant in {int(heads.significant.sum())} of {len(heads)} "
                   f"(layer, head) cells (Holm over all cells).")
    sens = sensitivity(df, alpha)
    if len(sens) > 1:
        others = sens[~sens.primary]
        held = others[others.holds]
        failed = others[~others.holds]
        s = (f"Across {len(others)} other settings (kernels, normalisations, bandwidths, estimators) the "
             f"conclusion <b>holds in {len(held)}</b>")
        if len(failed):
            s += " and differs in " + "; ".join(
                f"{html.escape(r.setting)} ({r.significant_layers} of {r.layers} layers significant)"
                for r in failed.itertuples())
        out.append(s + ".")
    out += _jsd_sentence(df)
    return out


def _jsd_sentence(df: pd.DataFrame) -> list[str]:
    clf = df[df.estimator.str.startswith("jsd_clf") & (df.comparison == "cross")]
    if clf.empty:
        return []
    head = POOLED if (clf["head"] == POOLED).any() else clf["head"].min()
    clf = clf[clf["head"] == head]
    evidence = clf[clf.ci_low > 0]
    units = clf.units.iloc[0] if "units" in clf else ""
    return [f"Classifier lower bounds on the cross-modal JSD: positive evidence (interval above 0) for "
            f"{evidence.layer.nunique()} of {clf.layer.nunique()} layers (largest bound "
            f"{fmt(clf.value.clip(lower=0).max())} {html.escape(str(units))}); bounds at or below 0 say "
            f"only that this probe found no evidence."]
