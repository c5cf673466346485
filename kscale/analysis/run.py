"""The analysis stage: ``run_analyze(spec)`` for the runner, ``analyze(cfg, out_dir)`` for everyone else.

Per store: the sample ids are streamed once to cut the samples into sample-aligned joint blocks
(source.py); buckets are a seeded hash of the sample id. Per layer::

    subsample (in memory) ──▶ plans: bandwidths (mmd.bandwidth_policy), standardisation, bins (plan.py)
         │                      │
         │                      ▼
         │        stream every joint block ──▶ mergeable TargetSums per head / pooled (features.py, stream.py)
         │                      │   + the direction sums, in the same pass (directions.py)
         ▼                      ▼
    exact + paper MMD      RF / linear MMD, histogram JSD, p-values, ratios        (rows.py, stats.py)
    pictures (embed.py)    classifier JSD bounds (their own streaming loops)       (probes.py)
                           directions: RF MMD along the leading directions (one more pass)

Passes over a layer's blocks (each a full read of the layer's selected heads): one per head group (all
heads in one when their feature sums fit ``mmd.max_accumulator_mb``; with the defaults' 18 configs of 4,096
features each head is a group and reads its column only), plus one for heads pooled when the heads are
split; the direction sums ride along (:func:`_stream_sums`); the directions' MMD needs the
decomposition of those sums, so it is one more pass (:func:`_direction_rows`). The probes (``jsd_clf``)
read the blocks in their own loops: training is sequential Adam steps over blocks in a seeded order (not a
map-reduce) and the held-out scoring needs the trained probes (:mod:`kscale.analysis.probes`).

Outputs in ``out_dir``: ``results.parquet`` / ``results.csv`` (the tidy table, columns in
``rows.COLUMNS``), ``directions.parquet`` / ``.csv`` (where the gap lives: :mod:`kscale.analysis.directions`),
``meta.json`` (config, versions, conventions), PNGs (:mod:`kscale.analysis.figures`)
and ``report.html`` (:func:`kscale.analysis.report.build_report`, which ``kscale report RUN_DIR`` calls).
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kscale.analysis import blas
from kscale.analysis import rows as R
from kscale.analysis.directions import (DirectionPlan, DirectionSums, decompose, direction_mmd_sums, direction_rows,
                                        direction_sums, merge_mmd, mmd_plan, write_directions)
from kscale.analysis.directions import merge as merge_directions
from kscale.analysis.embed import maps as embed_maps
from kscale.analysis.maps_helper import MapsHelper
from kscale.spec.analyze import AnalyzeConfig
from kscale.store.queries import vector_view
from kscale.analysis.features import (RF_KERNELS, ChunkPlan, FeatureConfig, TargetPlan, TargetSums, chunk_sums,
                                      draw_frequencies, merger)
from kscale.analysis.plan import POOLED, Comparison, Subsample, comparisons, layer_scales, pair_comparison, target_plan
from kscale.analysis.probes import probe_rows
from kscale.analysis.source import (BlockPlan, Buckets, KeyStoreLike, block_plan, has_index, index_block_plan,
                                    joint_items, open_store, range_items, read_rows, rows_per_block,
                                    subsample_index)
from kscale.analysis.stream import Runner
from kscale.output import (RUN_MARKER, OutputKind, claim_output, fence, recorded_spec, run_marker, run_marker_reader,
                           write_json_atomic)
from kscale.results import AnalyzeResult
from kscale.spec import JobSpec, section_problems


_FUSE_PASSES = True  # False: the direction sums take a pass of their own, as before they shared the MMD's
# (private: tests/unit/analysis/test_analysis_onepass.py and bench/scale.py compare the two; same rows)

ANALYZE_KIND = OutputKind("analysis run", run_marker_reader("analyze"))  # resume: same spec and stores only


def stores_identity(cfg: AnalyzeConfig) -> dict:
    """The identity of the key stores an analysis reads (``kscale.store.store_identity`` of each): recorded in
    the run's marker, so that a resume over a store re-extracted or extended since is refused."""
    from kscale.store.index import store_identity

    paths = [*cfg.stores, *([cfg.mmd.reference_store] if cfg.mmd.reference_store else [])]
    return {"source": "stores", "stores": {str(p): store_identity(p) for p in paths}}


def clear_run(path: Path) -> None:
    """Remove every output of an earlier attempt (all but the kind marker): the analysis recomputes the whole
    run, so the folder then holds only what this run writes, never a table or figure of another."""
    import shutil

    for p in Path(path).iterdir():
        if p.name == RUN_MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def claim_analysis(spec: JobSpec):
    """The run folder's claim (:mod:`kscale.output`): ``resume`` only of a run of the same spec over the same
    stores (else ``OutputExists`` / ``DataChanged``, saying what changed), and then cleared of the earlier
    attempt's outputs; ``overwrite`` starts from an empty folder."""
    from contextlib import contextmanager

    from kscale.spec import to_dict

    data, fields = stores_identity(spec.analyze), recorded_spec(to_dict(spec))  # no cluster.env secrets

    def create(tmp: Path) -> None:
        write_json_atomic(tmp / RUN_MARKER, run_marker("analyze", spec.fingerprint(), data, fields))

    @contextmanager
    def claimed():
        with claim_output(spec.output.path, spec.output.if_exists, ANALYZE_KIND, spec.fingerprint(), create,
                          data=data, spec=fields) as path:
            clear_run(path)
            yield path

    return claimed()


def stage_entry(spec: JobSpec, ctx) -> AnalyzeResult:
    """The stage table's entry (``kscale.spec.STAGES``): the analysis runs in this process (dask decides
    where its tasks go)."""
    return run_analyze(spec, ctx.show_bar)


def run_analyze(spec: JobSpec, show_bar: bool = True) -> AnalyzeResult:
    """Stage entry: ``spec.analyze`` is the :class:`AnalyzeConfig`, ``spec.output.path`` the run dir, claimed
    (:func:`claim_analysis`) for the run: locked, never a folder that is not an analysis run (its
    ``kscale.json``), never one of another spec or other stores. ``resume`` recomputes into the same run
    (cleared first); ``overwrite`` starts from an empty one."""
    t0 = time.time()

    with claim_analysis(spec):
        from kscale.executors.progress import StageBar

        bar = StageBar(spec.output.path, getattr(spec, "name", "analyze"), "analyze", "layer", show_bar=show_bar)
        try:
            df = analyze(spec.analyze, spec.output.path, progress=bar)
        finally:
            bar.close()
    return AnalyzeResult(name=getattr(spec, "name", "analyze"), out_dir=str(spec.output.path), rows=len(df),
                         seconds=round(time.time() - t0, 1), key_bytes=bar.bytes)


def analyze(cfg: AnalyzeConfig, out_dir: str | Path, stores: list[KeyStoreLike] | None = None,
            progress=None) -> pd.DataFrame:
    """Run the analysis; ``stores`` (opened readers) override ``cfg.stores`` (tests pass fakes). ``progress``
    (a :class:`kscale.executors.progress.StageBar`) advances by one per (store, layer) analysed. BLAS runs on
    one thread (:mod:`kscale.analysis.blas`; the exact rows get the process's own thread counts back)."""
    with blas.single_thread():
        return _analyze(cfg, out_dir, stores, progress)


def _analyze(cfg: AnalyzeConfig, out_dir: str | Path, stores: list[KeyStoreLike] | None, progress) -> pd.DataFrame:
    problems = [p for p in section_problems(cfg) if stores is None or p[0] != "stores"]
    if problems:
        raise ValueError("analyze: " + "; ".join(f"{k}: {m}" for k, m in problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stores = stores if stores is not None else [open_store(p) for p in cfg.stores]
    # analyze.vector: the analysis reads keys through one interface; a view of q or v answers it (the
    # attention and query-gap sections below read the stores themselves)
    views = [vector_view(ks, cfg.vector) for ks in stores]
    reference = _reference_store(cfg, views)
    if progress is not None:
        progress.set_total(sum(len(_select("layers", cfg.layers, ks.layers, "layer")) for ks in stores))
    all_rows, embeds, dir_rows, pairs = [], [], [], []
    helper = MapsHelper.start() if "tsne" in cfg.embed.methods else None
    with helper or nullcontext():
        with Runner(cfg.dask) as runner:  # closed before the pictures: a dask cluster's workers are not needed
            for ks in views:
                store_rows, store_embeds = analyze_store(cfg, ks, runner, reference, progress, helper, dir_rows)
                all_rows += store_rows
                embeds += store_embeds
                pair_rows, notes = pair_runs(cfg, ks, runner, reference)
                all_rows += pair_rows
                pairs += notes
        df = pd.DataFrame(all_rows, columns=R.COLUMNS)
        df["vector"] = cfg.vector  # which kind every row compares (analyze.vector)
        fence(out)  # the run's lock is still ours (kscale.output.fence)
        df.to_parquet(out / "results.parquet", index=False)
        df.to_csv(out / "results.csv", index=False)
        (out / "meta.json").write_text(json.dumps({**_meta(cfg, stores), "modality_pairs": pairs}, indent=1,
                                                  default=str))
        from kscale.analysis.figures import write_pictures
        from kscale.analysis.report import build_report

        attention_beside_gap(stores, df, out)
        queries_beside_gap(cfg, stores, out)
        write_directions(dir_rows, out, POOLED)
        write_pictures(df, embeds, out, cfg)  # the t-SNE maps last: the helper may still be on them
    build_report(out)
    return df


VIDEO_PAIRS = (("video", "text"), ("video", "image"))


def modality_pairs(cfg: AnalyzeConfig, ks: KeyStoreLike, reference: KeyStoreLike | None = None) -> list[dict]:
    """Where a store has video tokens, the pairs run beside the configured comparisons: video vs text (unless
    ``image_modality: video`` made that the cross comparison already) and video vs image. A pair with fewer
    than 4 tokens on a side (or missing from the reference store that sets the bandwidths) says it is skipped."""
    layer0 = _select("layers", cfg.layers, ks.layers, "layer")[0]
    counts = {m: _count(ks, layer0, m) for m in ("image", "video", "text")}
    if counts["video"] == 0:
        return []
    ref = reference if reference is not None and reference is not ks else None
    out = []
    for x, y in VIDEO_PAIRS:
        if (x, y) == (cfg.image_modality, "text"):
            continue
        note = {"store": ks.path, "pair": [x, y], "comparison": pair_comparison(x, y).name,
                "tokens": {x: counts[x], y: counts[y]}}
        short = [m for m in (x, y) if counts[m] < 4]
        ref_short = [m for m in (x, y) if ref is not None and _count(ref, layer0, m) < 4]
        if short:
            note["skipped"] = f"fewer than 4 {' and '.join(short)} tokens"
        elif ref_short:
            note["skipped"] = f"the reference store has fewer than 4 {' and '.join(ref_short)} tokens"
        out.append(note)
    return out


def _count(ks: KeyStoreLike, layer: int, modality: str) -> int:
    try:
        return _n_rows(ks, layer, modality)
    except (KeyError, ValueError):  # a store (or a test's fake) without that modality
        return 0


def pair_runs(cfg: AnalyzeConfig, ks: KeyStoreLike, runner: Runner, reference: KeyStoreLike | None,
              ) -> tuple[list[dict], list[dict]]:
    """Rows of each :func:`modality_pairs` pair (comparison ``x_vs_y``: the same layers, heads, estimators
    and seed as the configured run, no pictures), and the notes ``meta.json`` and the report show."""
    notes = modality_pairs(cfg, ks, reference)
    quiet = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, methods=[]))
    rows: list[dict] = []
    for note in notes:
        if "skipped" not in note:
            rows += analyze_store(quiet, ks, runner, reference, pair=tuple(note["pair"]))[0]
    return rows, notes


def _reference_store(cfg: AnalyzeConfig, stores: list[KeyStoreLike]) -> KeyStoreLike | None:
    if cfg.mmd.bandwidth_policy != "reference":
        return None
    if cfg.mmd.reference_store is None:
        return stores[0]
    return next((ks for ks in stores if ks.path == cfg.mmd.reference_store), None) or vector_view(open_store(
        cfg.mmd.reference_store), cfg.vector)


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
        attn.save_figure(joined, corr, out / f"attention_vs_gap_{tag}.png", f"visual attention vs key gap — {tag}")


def queries_beside_gap(cfg: AnalyzeConfig, stores: list[KeyStoreLike], out: Path) -> None:
    """Where a store carries query vectors (``extract.attention.store_queries``), the gap text queries see
    (:mod:`kscale.analysis.qgap`): ``query_gap_<store>.csv``, one row per (layer, KV head)."""
    from kscale.analysis import qgap

    for ks in stores:
        if not qgap.has_queries(ks):
            continue
        table = qgap.query_gap(ks, _select("layers", cfg.layers, ks.layers, "layer"), cfg.significance.n_buckets,
                               cfg.seed, cfg.significance.alpha)
        table.insert(0, "store", ks.path)
        table.to_csv(out / f"query_gap_{Path(ks.path).name}.csv", index=False)


def _meta(cfg: AnalyzeConfig, stores: list[KeyStoreLike]) -> dict:
    import dask
    import scipy

    import kscale

    return {"config": dataclasses.asdict(cfg), "seed": cfg.seed,
            "stores": [{"path": ks.path, "attrs": ks.attrs} for ks in stores],
            "versions": {"kscale": kscale.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
                         "dask": dask.__version__, "pandas": pd.__version__},
            "head_pooled_id": POOLED, "estimator": cfg.mmd.estimator, "vector": cfg.vector,
            "bandwidth_policy": cfg.mmd.bandwidth_policy}


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


def _feature_configs(cfg: AnalyzeConfig) -> list[FeatureConfig]:
    """RF configs, the primary one (none, rbf, multiple closest to 1) first: it gets permutations."""
    configs = [FeatureConfig(n, k, float(m)) for n in cfg.mmd.normalisations for k in cfg.mmd.kernels
               if k in RF_KERNELS for m in cfg.mmd.bandwidth_multiples]
    return sorted(configs, key=lambda c: (c.normalisation != "none", c.kernel != "rbf",
                                          abs(np.log(c.multiple))))


@dataclass(frozen=True)
class StoreContext:
    """What every layer of one store shares: the store, selections, buckets and the joint blocks."""

    cfg: AnalyzeConfig
    ks: KeyStoreLike
    runner: Runner
    heads: list[int]
    mods: list[str]  # [image modality, "text"]: x and y of the cross comparison
    comps: list[Comparison]
    buckets: Buckets
    blocks: BlockPlan
    configs: list[FeatureConfig]
    lin_norms: list[str]
    reference: KeyStoreLike | None


@dataclass(frozen=True)
class LayerContext:
    """One layer of one store: its subsample, targets (head -> positions in the selection) and plans."""

    store: StoreContext
    layer: int
    sub: Subsample
    targets: dict[int, list[int]]
    plans: dict[int, TargetPlan]
    families: dict[int, dict[str, np.ndarray]]

    @property
    def cfg(self) -> AnalyzeConfig:
        return self.store.cfg


def _store_context(cfg: AnalyzeConfig, ks: KeyStoreLike, runner: Runner, reference,
                   pair: tuple[str, str] | None = None) -> StoreContext:
    """``pair`` (x, y): a modality-pair run (:func:`pair_runs`), its one comparison ``x_vs_y``."""
    heads = _select("heads", cfg.heads, ks.heads, "head")
    mods = list(pair) if pair else [cfg.image_modality, "text"]
    layer0 = _select("layers", cfg.layers, ks.layers, "layer")[0]
    for m in mods:
        n = _n_rows(ks, layer0, m)
        if n < 4:
            raise ValueError(f"analyze: store {ks.path} has {n} {m} tokens; need at least 4")
    want = set(cfg.estimators)
    configs = _feature_configs(cfg) if "mmd_rf" in want else []
    lin_norms = list(cfg.mmd.normalisations) if "linear" in cfg.mmd.kernels and "mmd_rf" in want else []
    row_bytes = _row_bytes(ks, heads, layer0)
    per_sample = max(1, len(configs)) * 2 * cfg.mmd.n_features * 8 * len(mods)
    max_samples = max(1, cfg.mmd.max_accumulator_mb * 2**20 // (per_sample * (runner.window + 1)))
    max_rows, where = rows_per_block(cfg.dask.chunk_mb, row_bytes), f"store {ks.path}"
    if has_index(ks):  # blocks of whole shards from the index: no per-shard task, no id read for small shards
        blocks = index_block_plan(ks, mods, max_rows, max_samples, where)
    else:
        blocks = block_plan({m: ks.token_column(m, "sample_id") for m in mods}, max_rows, max_samples, where)
    comps = [pair_comparison(*pair)] if pair else comparisons(cfg.comparisons, cfg.image_modality)
    return StoreContext(cfg, ks, runner, heads, mods, comps,
                        Buckets(cfg.significance.n_buckets, cfg.seed), blocks, configs, lin_norms, reference)


def analyze_store(cfg: AnalyzeConfig, ks: KeyStoreLike, runner: Runner, reference: KeyStoreLike | None = None,
                  progress=None, helper: MapsHelper | None = None, directions: list[dict] | None = None,
                  pair: tuple[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Rows of every selected layer, and the maps of the picture layers, made as soon as a layer's subsample
    is read (t-SNE in ``helper``, when given, while the next layers are analysed). Rows of the directions
    table (:mod:`kscale.analysis.directions`) are appended to ``directions`` when given."""
    sc = _store_context(cfg, ks, runner, reference, pair)
    layers = _select("layers", cfg.layers, ks.layers, "layer")
    embed_layers = _embed_layers(cfg, layers)
    rows, embeds = [], []
    for layer in layers:
        lc = _layer_context(sc, layer, layer in embed_layers)
        if layer in embed_layers:
            embeds.append({"store": ks.path, "layer": layer, "heads": sc.heads, "maps": embed_maps(
                lc.sub.keys, cfg.embed.methods, cfg.embed.subsample, cfg.embed.perplexity, cfg.seed, helper)})
        sums, dir_sums = _stream_sums(lc, directions=directions is not None and _FUSE_PASSES)
        rows += _layer_rows(lc, sums)
        if directions is not None:
            directions += _direction_rows(lc, dir_sums)
        if progress is not None:  # keys streamed for this layer: every selected head of both modalities
            progress.advance(1, nbytes=sum(_n_rows(ks, layer, m) for m in sc.mods) * _row_bytes(ks, sc.heads, layer),
                             detail=f"{Path(ks.path).name} layer {layer}")
    return rows, embeds


def _n_rows(ks: KeyStoreLike, layer: int, modality: str) -> int:
    return ks.n_tokens()[modality] if has_index(ks) else ks.keys(layer, modality).shape[0]


def _row_bytes(ks: KeyStoreLike, heads: list[int], layer: int) -> int:
    """Bytes of one token's keys over ``heads`` as stored (from the store's attributes: no graph built)."""
    dtype = ks.attrs["key_dtype"] if has_index(ks) else ks.keys(layer, "text").dtype
    return len(heads) * ks.head_dim * np.dtype(dtype).itemsize


def _subsample(sc: StoreContext, ks: KeyStoreLike, layer: int, for_embed: bool) -> Subsample:
    cfg = sc.cfg
    k = max(cfg.mmd.median_subsample, 2 * cfg.exact_subsample, cfg.embed.subsample if for_embed else 0)
    keys, ids, bks = {}, {}, {}
    for i, m in enumerate(sc.mods):
        idx = subsample_index(_n_rows(ks, layer, m), k, cfg.seed + 1000 * layer + i)
        if has_index(ks):  # a few coarse gathers, not one task per shard hit
            keys[m] = np.asarray(ks.keys_at(layer, m, idx, sc.heads), np.float64)
            ids[m] = np.asarray(ks.column_at(m, "sample_id", idx), np.int64)
        else:
            keys[m] = read_rows(ks.keys(layer, m, sc.heads), idx)
            ids[m] = read_rows(ks.token_column(m, "sample_id"), idx, dtype=np.int64)
        bks[m] = sc.buckets.of(ids[m])
    return Subsample(keys, ids, bks)


def _layer_context(sc: StoreContext, layer: int, for_embed: bool) -> LayerContext:
    cfg = sc.cfg
    sub = _subsample(sc, sc.ks, layer, for_embed)
    norms = sorted({c.normalisation for c in sc.configs} | set(cfg.mmd.normalisations))
    ref_sub = _subsample(sc, sc.reference, layer, False) if sc.reference is not None else None
    shared = layer_scales(cfg, sub, sc.heads, norms, ref_sub)
    targets = {h: [i] for i, h in enumerate(sc.heads)}
    if cfg.pooled and len(sc.heads) > 1:
        targets[POOLED] = list(range(len(sc.heads)))
    plans, families = {}, {}
    for t, pos in targets.items():
        plans[t], families[t] = target_plan(cfg, sub, pos, sc.comps, norms, "jsd_hist" in cfg.estimators, shared)
    return LayerContext(sc, layer, sub, targets, plans, families)


def _head_groups(lc: LayerContext, directions: bool = False) -> list[list[int]]:
    """Split heads so that (window + 1) partial sums of a group (+ pooled) fit the memory budget
    (``directions``: with the direction sums riding along, (d + 1) x d per modality and target)."""
    cfg, sc = lc.cfg, lc.store
    plan0 = next(iter(lc.plans.values()))
    n_hist = 0 if plan0.proj_dP is None else plan0.proj_dP.shape[1]
    K, D, d = cfg.significance.n_buckets, cfg.mmd.n_features, sc.ks.head_dim
    per_target = len(sc.mods) * (K * (len(sc.configs) * 3 * D + n_hist * cfg.jsd.bins + 2 * d)
                                 + (d + 1) * d * directions) * 8
    fit = int(cfg.mmd.max_accumulator_mb * 2**20 // ((sc.runner.window + 1) * per_target)) - 1
    size = max(1, min(len(sc.heads), fit))
    return [sc.heads[i:i + size] for i in range(0, len(sc.heads), size)]


def _chunk_plan(lc: LayerContext, group: list[int], freqs, singles: bool, pooled: bool) -> ChunkPlan:
    cfg, sc = lc.cfg, lc.store
    targets = {h: dataclasses.replace(lc.plans[h], heads=[group.index(h)]) for h in group} if singles else {}
    if pooled:
        targets[POOLED] = dataclasses.replace(lc.plans[POOLED], heads=list(range(len(group))))
    return ChunkPlan(freqs, sc.configs, sc.lin_norms, targets, sc.buckets, cfg.mmd.compute_dtype,
                     cfg.mmd.batch_rows, cfg.significance.max_permutation_units
                     if cfg.significance.permutations > 0 else 0, cfg.mmd.backend)


def layer_items(lc: LayerContext, heads: list[int]) -> list[dict]:
    """The layer's joint blocks for a head selection: modality -> (delayed keys, delayed sample ids)."""
    sc = lc.store
    if has_index(sc.ks):  # one read per block and modality over a run of shards
        return range_items(sc.ks, lc.layer, heads, sc.blocks)
    keys = {m: sc.ks.keys(lc.layer, m, heads) for m in sc.mods}
    ids = {m: sc.ks.token_column(m, "sample_id") for m in sc.mods}
    return joint_items(keys, ids, sc.blocks)


def _direction_plan(lc: LayerContext, group: list[int], singles: bool, pooled: bool) -> DirectionPlan:
    """The direction sums' plan for one pass over ``group``'s heads (as :func:`_chunk_plan`: each head of the
    group, heads pooled when ``pooled``); centres are the standardisation centres of the layer's plans."""
    def centre(t: int) -> np.ndarray:
        return np.asarray(lc.plans[t].centre_d, np.float64)

    targets = {h: ([group.index(h)], centre(h)) for h in group} if singles else {}
    if pooled:
        targets[POOLED] = (list(range(len(group))), centre(POOLED))
    return DirectionPlan(targets, tuple(lc.store.mods), lc.cfg.mmd.batch_rows)


def _stream_sums(lc: LayerContext, directions: bool = False,
                 ) -> tuple[dict[int, TargetSums], dict[int, dict[str, DirectionSums]] | None]:
    """Streamed TargetSums per target; heads in memory-bounded groups. Heads pooled need every head of a
    sample in one pass (its per-sample sums span heads), so when heads are split pooled gets its own pass.
    With ``directions`` the direction sums (:func:`kscale.analysis.directions.direction_sums`) of each pass's
    targets are summed in the same pass (:meth:`Runner.map_reduce_fused`: one read of the blocks, each part's
    sums and merge order as in a pass of its own); else the second value is None."""
    cfg, sc = lc.cfg, lc.store
    freqs = draw_frequencies(sc.ks.head_dim, cfg.mmd.n_features, orthogonal=cfg.mmd.orthogonal,
                             seed=cfg.seed) if sc.configs else None
    merge = merger(cfg.significance.max_permutation_units)
    groups, pooled = _head_groups(lc, directions), POOLED in lc.plans
    passes = [(g, True, pooled and len(groups) == 1) for g in groups]
    if pooled and len(groups) > 1:
        passes.append((sc.heads, False, True))
    out: dict[int, TargetSums] = {}
    dirs: dict[int, dict[str, DirectionSums]] = {}
    for group, singles, with_pooled in passes:
        plan = _chunk_plan(lc, group, freqs, singles, with_pooled)
        items = layer_items(lc, group)
        if directions:
            sums, dsums = sc.runner.map_reduce_fused(items, [
                (chunk_sums, plan, merge),
                (direction_sums, _direction_plan(lc, group, singles, with_pooled), merge_directions)])
            dirs.update(dsums)
        else:
            sums = sc.runner.map_reduce(chunk_sums, items, plan, merge)
        out.update(sums)
    return out, ({t: dirs[t] for t in lc.targets} if directions else None)


def _direction_rows(lc: LayerContext, sums: dict[int, dict[str, DirectionSums]] | None = None) -> list[dict]:
    """Where the gap lives (:mod:`kscale.analysis.directions`): the per-modality second moments ``sums`` (per
    target, from :func:`_stream_sums`; None: summed here in a pass of their own, as before the fusion) are
    decomposed, then one more pass sums the RF features along each target's leading directions."""
    sc = lc.store
    plan = DirectionPlan({t: (pos, np.asarray(lc.plans[t].centre_d, np.float64)) for t, pos in lc.targets.items()},
                         tuple(sc.mods), lc.cfg.mmd.batch_rows)
    items = layer_items(lc, sc.heads)
    if sums is None:
        sums = sc.runner.map_reduce(direction_sums, items, plan, merge_directions)
    decomposed = {t: decompose(by[sc.mods[0]], by[sc.mods[1]]) for t, by in sums.items()}
    mplan = mmd_plan(plan, decomposed, lc.cfg.seed)  # the second pass: RF MMD^2 along the leading directions
    mmd = sc.runner.map_reduce(direction_mmd_sums, items, mplan, merge_mmd)
    return direction_rows(sc.ks.path, lc.layer, sums, sc.mods, mmd)


def _n_samples(lc: LayerContext, sums: dict[int, TargetSums]) -> dict[str, int]:
    ts = next(iter(sums.values()))
    out = {"cross": int(ts.union_K.sum())}
    for c in lc.store.comps:
        out[c.name] = int(ts.by_mod[c.mod_x].samples_K.sum()) if c.mod_x == c.mod_y else out["cross"]
    return out


def _layer_rows(lc: LayerContext, sums: dict[int, TargetSums]) -> list[dict]:
    """The layer's table rows from its streamed sums (:func:`_stream_sums`) and subsample, and the probes'."""
    cfg, sc = lc.cfg, lc.store
    n_samples = _n_samples(lc, sums)
    rows = []
    for t in lc.targets:
        ctx = R.Context(sc.ks.path, lc.layer, t, cfg.significance.alpha, n_samples, cfg.mmd.estimator,
                        cfg.mmd.bandwidth_policy, cfg.seed)
        rows += _target_rows(lc, ctx, t, sums[t])
    if "jsd_clf" in cfg.estimators and cfg.jsd.classifiers:
        rows += probe_rows(lc, n_samples, layer_items(lc, sc.heads))
    return rows


def _conventions(cfg: AnalyzeConfig, kind: str) -> dict:
    est = cfg.mmd.estimator
    pairs = ("sample-block U-statistic: every pair of tokens within one sample left out (both sides and "
             "across)" if est == "block" else "token-level U-statistic: only i = j left out")
    base = {"se": f"delete-one-bucket jackknife over {cfg.significance.n_buckets} sample buckets "
                  "(seeded hash of the sample id)",
            "ci": f"{1 - cfg.significance.alpha:.0%} t interval", "pooled_head_id": POOLED, "seed": cfg.seed,
            "bandwidth_policy": cfg.mmd.bandwidth_policy}
    if kind == "rf":
        return {**base, "estimator": est, "pairs": pairs,
                "features": "orthogonal" if cfg.mmd.orthogonal else "iid", "D": cfg.mmd.n_features,
                "bandwidth": "multiple x sqrt(median |x-y|^2) of a balanced pool (equal per modality)",
                "approx_sd": "sd of per-frequency terms / sqrt(D)", "p": "cross-MMD one-sided t"}
    if kind == "linear":
        return {**base, "estimator": est, "pairs": pairs, "kernel": "linear x.y", "p": "cross-MMD"}
    if kind == "exact":
        return {**base, "estimator": est, "pairs": pairs, "computation": "exact kernel, float64 blocks",
                "subsample": cfg.exact_subsample, "matched_sizes": True}
    if kind == "ratio":
        return {**base, "ci": "Fieller, covariance of joint delete-one-bucket replicates", "estimator": est}
    return {**base, "se": f"delete-one-bucket jackknife over {cfg.significance.n_buckets} buckets",
            "bins": cfg.jsd.bins, "binning": "shared quantiles of the pooled subsample; a value on an "
            "interior edge counts in the bin above", "bias_correction": "(B-1)(1/n+1/m)/8 nats subtracted",
            "value": "mean over columns"}


def _target_rows(lc: LayerContext, ctx: R.Context, t: int, ts: TargetSums) -> list[dict]:
    cfg, sc = lc.cfg, lc.store
    plan, want = lc.plans[t], set(cfg.estimators)
    rows, reps, cross_rows = [], {}, {}
    for comp in sc.comps:
        if sc.configs:
            rf, reps[comp.name] = R.rf_rows(ctx, ts, comp, sc.configs, plan.bandwidth, _conventions(cfg, "rf"))
            R.permutation_row_update(ctx, rf, ts, comp, sc.buckets, cfg.significance.permutations)
            rows += rf
            if comp.name == "cross":  # ratio rows take their p from these (rows.RATIO_P)
                cross_rows = {(c.normalisation, c.kernel, c.multiple): r for c, r in zip(sc.configs, rf)}
        rows += R.linear_rows(ctx, ts, comp, sc.lin_norms, _conventions(cfg, "linear"))
        if "jsd_hist" in want:
            rows += R.hist_rows(ctx, ts, comp, lc.families[t], cfg.jsd.units, _conventions(cfg, "hist"))
        if "mmd_exact" in want:
            rows += R.exact_rows(ctx, lc.sub, comp, lc.targets[t], cfg, plan, _conventions(cfg, "exact"))
            if cfg.paper_mode.enabled:
                rows += R.paper_rows(ctx, lc.sub, comp, lc.targets[t], cfg.exact_subsample, cfg.paper_mode)
    return rows + _ratio_rows(ctx, reps, sc.configs, cfg, cross_rows)


def _ratio_rows(ctx: R.Context, reps: dict, configs: list[FeatureConfig], cfg: AnalyzeConfig,
                cross_rows: dict) -> list[dict]:
    if "cross" not in reps:
        return []
    conv = _conventions(cfg, "ratio")
    rows = []
    intras = [i for i in ("intra_text", "intra_image") if i in reps]
    for intra in intras:
        rows += R.ratio_rows(ctx, reps["cross"], reps[intra], intra, conv, cross_rows)
    key = (configs[0].normalisation, configs[0].kernel, configs[0].multiple)
    return R.gap_row(ctx, reps["cross"][key], [reps[i][key] for i in intras], key, conv,
                     cross_rows.get(key)) + rows
