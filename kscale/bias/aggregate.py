"""The aggregate table: per (variant, task) means of the per-sample measures with bootstrap intervals.

Samples are the independent units: every interval is a percentile bootstrap over samples (multinomial
resampling weights, seeded by ``bias.seed``), the same weights for every metric of a group, so paired
measures (differences of two conditions of the same sample) keep their pairing. ``task`` is each
generated task and ``all``.

Metrics, beside the plain means of the per-sample columns (``ll_c``, ``acc_c``, ``mc_acc_c``,
``follows_image_c``, ``follows_text_c``, ``ll_drop_<order>_<f>``, ``auc_<order>``, ``agree_blind``):

- ``dependency_c`` = mean(ll_real - ll_c): visual dependency against condition c (0: the image is unused);
- ``acc_gap_c`` = mean(acc_real - acc_c);
- ``drop_loss_<order>`` = mean(ll at fraction 0 - curve area): log-likelihood lost on average along the
  dropping curve; ``image_vs_text_drop`` = drop_loss_random - drop_loss_text (< 0: image tokens are more
  redundant than as large a share of the text);
- ``blind_share`` = (mean ll_none - floor) / (mean ll_real - floor) (:func:`kscale.bias.metrics.blind_share`).

Legend: S samples, R bootstrap replicates, M metrics (columns).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kscale.spec.bias import CONDITIONS, DROP_ORDERS

MEAN_PREFIXES = ("ll_", "acc_", "mc_acc_", "follows_image_", "follows_text_", "auc_", "agree_blind",
                 "mc_agree_blind")
REPLICATE_CHUNK = 256


def derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Per-sample metric columns (S, M), NaN where a metric does not apply to a sample."""
    out: dict[str, pd.Series] = {}
    for col in df.columns:
        if col.startswith(MEAN_PREFIXES) and not col.startswith(("ll_sum_", "ll_floor")) \
                and pd.api.types.is_numeric_dtype(df[col]):
            out[col] = df[col].astype(float)
    for c in CONDITIONS[1:]:
        if f"ll_{c}" in df:
            out[f"dependency_{c}"] = df["ll_real"] - df[f"ll_{c}"]
            out[f"acc_gap_{c}"] = df["acc_real"] - df[f"acc_{c}"]
    for order in DROP_ORDERS:
        if f"auc_{order}" in df:
            out[f"drop_loss_{order}"] = df[f"ll_drop_{order}_0.00"] - df[f"auc_{order}"]
    if "drop_loss_random" in out and "drop_loss_text" in out:
        out["image_vs_text_drop"] = out["drop_loss_random"] - out["drop_loss_text"]
    if "ll_none" in df:
        out["_blind_num"] = df["ll_none"] - df["ll_floor"]
        out["_blind_den"] = df["ll_real"] - df["ll_floor"]
    return pd.DataFrame(out)


def bootstrap_means(X_SM: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(R, M) column means of resampled samples; a column's NaNs are left out of its own mean."""
    S, M = X_SM.shape
    rng = np.random.default_rng([seed, S])
    ok_SM = ~np.isnan(X_SM)
    X0_SM = np.where(ok_SM, X_SM, 0.0)
    out = np.empty((n_boot, M))
    for a in range(0, n_boot, REPLICATE_CHUNK):
        r = min(REPLICATE_CHUNK, n_boot - a)
        W_RS = rng.multinomial(S, np.full(S, 1.0 / S), size=r).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a:a + r] = (W_RS @ X0_SM) / (W_RS @ ok_SM)
    return out


def group_rows(D: pd.DataFrame, n_boot: int, confidence: float, seed: int) -> list[dict]:
    """(metric, value, ci_low, ci_high, n) for one group of samples."""
    X = D.to_numpy(dtype=float)
    ok = ~np.isnan(X)
    with np.errstate(invalid="ignore", divide="ignore"):
        point = np.where(ok, X, 0.0).sum(0) / ok.sum(0)
    boot = bootstrap_means(X, n_boot, seed)
    cols = list(D.columns)
    values = {c: (point[i], boot[:, i]) for i, c in enumerate(cols)}
    if "_blind_num" in values:
        (pn, bn), (pd_, bd) = values.pop("_blind_num"), values.pop("_blind_den")
        with np.errstate(invalid="ignore", divide="ignore"):
            values["blind_share"] = (pn / pd_, bn / bd)
    counts = {c: int((~np.isnan(X[:, i])).sum()) for i, c in enumerate(cols)}
    counts["blind_share"] = counts.get("_blind_num", 0)
    alpha = (1.0 - confidence) / 2
    rows = []
    for name, (value, reps) in values.items():
        reps = reps[np.isfinite(reps)]
        lo, hi = (np.quantile(reps, [alpha, 1 - alpha]) if len(reps) else (np.nan, np.nan))
        rows.append({"metric": name, "value": float(value), "ci_low": float(lo), "ci_high": float(hi),
                     "n": counts[name]})
    return rows


def aggregate(samples: pd.DataFrame, cfg) -> pd.DataFrame:
    """One row per (variant, run, step, task, metric); ``task`` includes ``all``."""
    D = derived_columns(samples)
    out = []
    for (variant, run, step), idx in samples.groupby(["variant", "run", "step"], sort=False).groups.items():
        sub = samples.loc[idx]
        tasks = [("all", idx)] + [(t, g) for t, g in sub.groupby("task").groups.items() if t and sub.task.nunique() > 1]
        for task, rows_idx in tasks:
            for row in group_rows(D.loc[rows_idx], cfg.bootstrap, cfg.confidence, cfg.seed):
                out.append({"variant": variant, "run": run, "step": int(step), "task": task, **row})
    return pd.DataFrame(out)
