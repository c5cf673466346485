"""The analysis stage: ``run_analyze(spec)`` for the runner, ``analyze(cfg, out_dir)`` for everyone else.

Per store and layer::

    subsample (in memory) ──▶ plans: bandwidths, standardisation, histogram bins   (plan.py)
         │                      │
         │                      ▼
         │        stream every block of keys ──▶ mergeable Sums per head / pooled   (features.py, stream.py)
         │                      │
         ▼                      ▼
    exact + paper MMD      RF / linear MMD, histogram JSD, p-values, ratios        (rows.py, stats.py)
    pictures (embed.py)    classifier JSD bounds (second streaming loop)           (probes.py)

Outputs in ``out_dir``: ``results.parquet`` / ``results.csv`` (the tidy table, columns in
``rows.COLUMNS``), ``meta.json`` (config, versions, conventions), PNGs and ``report.html``
(:func:`kscale.analysis.report.build_report`, which ``kscale report RUN_DIR`` calls).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kscale.analysis import rows as R
from kscale.analysis.config import AnalyzeConfig
from kscale.analysis.features import (RF_KERNELS, ChunkPlan, FeatureConfig, TargetPlan, chunk_sums,
                                      draw_frequencies, merge_sums)
from kscale.analysis.plan import POOLED, Comparison, Subsample, comparisons, target_plan
from kscale.analysis.probes import probe_rows
from kscale.analysis.source import (Buckets, KeyStoreLike, blocks, bucket_table, open_store, read_rows,
                                    subsample_index)
from kscale.analysis.stream import Runner
from kscale.output import (RUN_MARKER, OutputKind, claim_output, run_marker, run_marker_reader,
                           write_json_atomic)
from kscale.results import AnalyzeResult
from kscale.spec import JobSpec, section_problems


ANALYZE_KIND = OutputKind("analysis run", run_marker_reader("analyze"), check_fingerprint=False)


def run_analyze(spec: JobSpec) -> AnalyzeResult:
    """Stage entry: ``spec.analyze`` is the :class:`AnalyzeConfig`, ``spec.output.path`` the run dir, claimed
    (:mod:`kscale.output`) for the run: locked, and never a folder that is not an analysis run (its
    ``kscale.json``). ``resume`` recomputes into the same run; ``overwrite`` starts from an empty one."""
    t0 = time.time()

    def create(tmp: Path) -> None:
        write_json_atomic(tmp / RUN_MARKER, run_marker("analyze", spec.fingerprint()))

    with claim_output(spec.output.path, spec.output.if_exists, ANALYZE_KIND, spec.fingerprint(), create):
        df = analyze(spec.analyze, spec.output.path)
    return AnalyzeResult(name=getattr(spec, "name", "analyze"), out_dir=str(spec.output.path), rows=len(df),
                         seconds=round(time.time() - t0, 1))


def analyze(cfg: AnalyzeConfig, out_dir: str | Path, stores: list[KeyStoreLike] | None = None,
            ) -> pd.DataFrame:
    """Run the analysis; ``stores`` (opened readers) override ``cfg.stores`` (tests pass fakes)."""
    problems = [p for p in section_problems(cfg) if stores is None or p[0] != "stores"]
    if problems:
        raise ValueError("analyze: " + "; ".join(f"{k}: {m}" for k, m in problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stores = stores if stores is not None else [open_store(p) for p in cfg.stores]
    all_rows, embeds = [], []
    with Runner(cfg.dask) as runner:
        for ks in stores:
            store_rows, store_embeds = analyze_store(cfg, ks, runner)
            all_rows += store_rows
            embeds += store_embeds
    df = pd.DataFrame(all_rows, columns=R.COLUMNS)
    df.to_parquet(out / "results.parquet", index=False)
    df.to_csv(out / "results.csv", index=False)
    (out / "meta.json").write_text(json.dumps(_meta(cfg, stores), indent=1, default=str))
    from kscale.analysis.report import build_report, write_pictures

    write_pictures(df, embeds, out, cfg)
    attention_beside_gap(stores, df, out)
    build_report(out)
    return df


def attention_beside_gap(stores: list[KeyStoreLike], df: pd.DataFrame, out: Path) -> None:
    """Where a store carries attention statistics (``extract.attention``), put visual attention
    utilisation beside the key gap: tables and one figure per store (docs/attention.md)."""
    from kscale.attention import report as attn

    for ks in stores:
        table = ks.table("attention") if hasattr(ks, "table") else {}
        if not table:
            continue
        tag = Path(ks.path).name
        gap = df[(df["store"] == ks.path) & (df["kernel"] == "rbf") & (df["normalisation"] == "none")]
        gap = gap[np.isclose(gap["multiple"].astype(float), 1.0)]
        util = attn.utilization(table, "kv_head")
        util.to_csv(out / f"attention_utilization_{tag}.csv", index=False)
        joined, corr = attn.beside_key_gap(table, gap)
        joined.to_parquet(out / f"attention_vs_gap_{tag}.parquet", index=False)
        joined.to_csv(out / f"attention_vs_gap_{tag}.csv", index=False)
        corr.to_csv(out / f"attention_gap_correlation_{tag}.csv", index=False)
        fig = attn.figure(joined, corr, title=f"visual attention vs key gap — {tag}")
        fig.savefig(out / f"attention_vs_gap_{tag}.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)


def _meta(cfg: AnalyzeConfig, stores: list[KeyStoreLike]) -> dict:
    import dask
    import scipy

    import kscale

    return {"config": dataclasses.asdict(cfg),
            "stores": [{"path": ks.path, "attrs": ks.attrs} for ks in stores],
            "versions": {"kscale": kscale.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
                         "dask": dask.__version__, "pandas": pd.__version__},
            "head_pooled_id": POOLED}


def _select(name: str, wanted, present: list[int], what: str) -> list[int]:
    if wanted == "all":
        return list(present)
    for i, v in enumerate(wanted):
        if v not in present:
            raise ValueError(f"analyze.{name}[{i}]: {what} {v} not in the store (has {present})")
    return list(wanted)


def _embed_layers(cfg: AnalyzeConfig, layers: list[int]) -> list[int]:
    if not cfg.embed.methods:
        return []
    if cfg.embed.layers == "all":
        return layers
    if cfg.embed.layers:
        return [l for l in cfg.embed.layers if l in layers]
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def _n_samples(comps: list[Comparison], ids: dict[str, np.ndarray], buckets: Buckets) -> dict[str, int]:
    out = {}
    for c in comps:
        bx, by = buckets.of(ids[c.mod_x]), buckets.of(ids[c.mod_y])
        sx, sy = ids[c.mod_x][c.mask("x", bx)], ids[c.mod_y][c.mask("y", by)]
        out[c.name] = len(np.union1d(sx, sy))
    out["cross"] = out.get("cross", len(np.union1d(*ids.values())))
    return out


def _feature_configs(cfg: AnalyzeConfig) -> list[FeatureConfig]:
    """RF configs, the primary one (none, rbf, multiple closest to 1) first: it gets permutations."""
    configs = [FeatureConfig(n, k, float(m)) for n in cfg.mmd.normalisations for k in cfg.mmd.kernels
               if k in RF_KERNELS for m in cfg.mmd.bandwidth_multiples]
    return sorted(configs, key=lambda c: (c.normalisation != "none", c.kernel != "rbf",
                                          abs(np.log(c.multiple))))


def analyze_store(cfg: AnalyzeConfig, ks: KeyStoreLike, runner: Runner) -> tuple[list[dict], list[dict]]:
    layers = _select("layers", cfg.layers, ks.layers, "layer")
    heads = _select("heads", cfg.heads, ks.heads, "head")
    mods = [cfg.image_modality, "text"]
    sids = {m: np.asarray(ks.tokens(m)["sample_id"]) for m in mods}
    for m in mods:
        if len(sids[m]) < 4:
            raise ValueError(f"analyze: store {ks.path} has {len(sids[m])} {m} tokens; need at least 4")
    buckets = bucket_table(list(sids.values()), cfg.significance.n_buckets, cfg.seed)
    comps = comparisons(cfg.comparisons, cfg.image_modality)
    n_samples = _n_samples(comps, {m: np.unique(s) for m, s in sids.items()}, buckets)
    embed_layers = _embed_layers(cfg, layers)
    rows, embeds = [], []
    for layer in layers:
        sub = _subsample(cfg, ks, layer, heads, mods, sids, buckets, layer in embed_layers)
        if layer in embed_layers:
            embeds.append({"store": ks.path, "layer": layer, "keys": sub.keys, "heads": heads})
        rows += _layer_rows(cfg, ks, runner, layer, heads, sub, sids, buckets, comps, n_samples)
    return rows, embeds


def _subsample(cfg, ks, layer, heads, mods, sids, buckets, for_embed: bool) -> Subsample:
    k = max(cfg.mmd.median_subsample, 2 * cfg.exact_subsample, cfg.embed.subsample if for_embed else 0)
    keys, ids, bks = {}, {}, {}
    for i, m in enumerate(mods):
        idx = subsample_index(len(sids[m]), k, cfg.seed + 1000 * layer + i)
        keys[m] = read_rows(ks.keys(layer, m, heads), idx)
        ids[m] = sids[m][idx]
        bks[m] = buckets.of(ids[m])
    return Subsample(keys, ids, bks)


def _head_groups(cfg: AnalyzeConfig, heads: list[int], d: int, n_configs: int, n_hist_cols: int,
                 runner: Runner) -> list[list[int]]:
    """Split heads so that (window + 1) partial Sums of a group (+ pooled) fit the memory budget."""
    K, D = cfg.significance.n_buckets, cfg.mmd.n_features
    per_target = K * (n_configs * 2 * D + n_hist_cols * cfg.jsd.bins + 2 * d) * 8
    fit = int(cfg.mmd.max_accumulator_mb * 2**20 // ((runner.window + 1) * per_target)) - 1
    size = max(1, min(len(heads), fit))
    return [heads[i:i + size] for i in range(0, len(heads), size)]


def _layer_rows(cfg, ks, runner, layer, heads, sub, sids, buckets, comps, n_samples) -> list[dict]:
    want = set(cfg.estimators)
    configs = _feature_configs(cfg) if "mmd_rf" in want else []
    lin_norms = list(cfg.mmd.normalisations) if "linear" in cfg.mmd.kernels and "mmd_rf" in want else []
    norms_needed = sorted({c.normalisation for c in configs} | set(cfg.mmd.normalisations))
    targets = {h: [i] for i, h in enumerate(heads)}
    if cfg.pooled and len(heads) > 1:
        targets[POOLED] = list(range(len(heads)))
    plans, families = {}, {}
    for t, pos in targets.items():
        plans[t], families[t] = target_plan(cfg, sub, pos, comps, norms_needed, "jsd_hist" in want)
    sums = _stream_sums(cfg, ks, runner, layer, heads, sids, buckets, plans, configs, lin_norms, comps)
    rows = []
    for t, pos in targets.items():
        ctx = R.Context(ks.path, layer, t, cfg.significance.alpha, n_samples)
        rows += _target_rows(cfg, ctx, sums[t], sub, pos, plans[t], families[t], configs, lin_norms,
                             comps, buckets)
    if "jsd_clf" in want and cfg.jsd.classifiers:
        items = {m: blocks(ks.keys(layer, m, heads), sids[m], cfg.dask.chunk_mb) for m in set(sids)}
        probe_targets = {t: (pos, plans[t]) for t, pos in targets.items()}

        def ctx_rows(t):
            return lambda **kw: R.row(store=ks.path, layer=layer, head=t,
                                      n_samples=n_samples[kw["comparison"]], **kw)

        for comp in comps:
            rows += probe_rows(cfg, runner, items, comp, probe_targets, buckets, ctx_rows)
    return rows


def _stream_sums(cfg, ks, runner, layer, heads, sids, buckets, plans, configs, lin_norms, comps):
    """Streamed Sums per target and modality; heads in memory-bounded groups, pooled merged across."""
    d = ks.head_dim
    freqs = draw_frequencies(d, cfg.mmd.n_features, orthogonal=cfg.mmd.orthogonal, seed=cfg.seed) \
        if configs else None
    n_cols = 0 if plans[next(iter(plans))].proj_dP is None else plans[next(iter(plans))].proj_dP.shape[1]
    n_units = sum(len(np.unique(s)) for s in sids.values())
    collect = cfg.significance.permutations > 0 and n_units <= cfg.significance.max_permutation_units
    out: dict[int, dict] = {t: {} for t in plans}
    for group in _head_groups(cfg, heads, d, len(configs), n_cols, runner):
        targets = {h: dataclasses.replace(plans[h], heads=[group.index(h)]) for h in group}
        if POOLED in plans:
            targets[POOLED] = dataclasses.replace(plans[POOLED], heads=list(range(len(group))))
        plan = ChunkPlan(freqs, configs, lin_norms, targets, buckets.ids, buckets.bucket_of,
                         buckets.n_buckets, cfg.mmd.compute_dtype, cfg.mmd.batch_rows, collect)
        for m, s in sids.items():
            items = blocks(ks.keys(layer, m, group), s, cfg.dask.chunk_mb)
            part = runner.map_reduce(chunk_sums, items, plan, merge_sums)
            for t, sm in part.items():
                out[t][m] = out[t][m].merge(sm) if m in out[t] else sm
    return out


def _conventions(cfg: AnalyzeConfig, kind: str) -> dict:
    base = {"se": f"witness variance clustered by {cfg.significance.n_buckets} sample buckets",
            "ci": f"{1 - cfg.significance.alpha:.0%} t interval", "pooled_head_id": POOLED}
    if kind == "rf":
        return {**base, "estimator": "unbiased U-statistic from feature sums",
                "features": "orthogonal" if cfg.mmd.orthogonal else "iid", "D": cfg.mmd.n_features,
                "bandwidth": "multiple x median |x-y| (pooled subsample, equal per modality)",
                "approx_sd": "sd of per-frequency terms / sqrt(D)", "p": "cross-MMD one-sided t",
                "seed": cfg.seed}
    if kind == "linear":
        return {**base, "estimator": "unbiased |mean_x - mean_y|^2 (linear kernel)", "p": "cross-MMD"}
    if kind == "exact":
        return {**base, "estimator": "unbiased U-statistic, exact kernel, float64 blocks",
                "se": "witness variance clustered by sample", "subsample": cfg.exact_subsample,
                "matched_sizes": True}
    return {**base, "se": f"delete-one-bucket jackknife over {cfg.significance.n_buckets} buckets",
            "bins": cfg.jsd.bins, "binning": "shared quantiles of the pooled subsample",
            "bias_correction": "(B-1)(1/n+1/m)/8 nats subtracted", "value": "mean over columns"}


def _target_rows(cfg, ctx, sums, sub, pos, plan: TargetPlan, families, configs, lin_norms, comps,
                 buckets) -> list[dict]:
    want = set(cfg.estimators)
    rows, infl = [], {}
    for comp in comps:
        if configs:
            rf, infl[comp.name] = R.rf_rows(ctx, sums, comp, configs, plan.bandwidth, _conventions(cfg, "rf"))
            R.permutation_row_update(rf, sums, comp, buckets.of, cfg.significance.permutations,
                                     cfg.significance.max_permutation_units, cfg.seed)
            rows += rf
        rows += R.linear_rows(ctx, sums, comp, lin_norms, _conventions(cfg, "linear"))
        if "jsd_hist" in want:
            rows += R.hist_rows(ctx, sums, comp, families, cfg.jsd.units, _conventions(cfg, "hist"))
        if "mmd_exact" in want:
            rows += R.exact_rows(ctx, sub, comp, pos, cfg.exact_subsample, list(cfg.mmd.normalisations),
                                 list(cfg.mmd.kernels), list(cfg.mmd.bandwidth_multiples), plan,
                                 _conventions(cfg, "exact"))
            if cfg.paper_mode.enabled:
                rows += R.paper_rows(ctx, sub, comp, pos, cfg.exact_subsample, cfg.paper_mode, cfg.seed)
    for intra in ("intra_text", "intra_image"):
        if "cross" in infl and intra in infl:
            rows += R.ratio_rows(ctx, infl["cross"], infl[intra], intra,
                                 {"ci": "Fieller, covariance from joint bucket influences"})
    return rows
