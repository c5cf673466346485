"""How often the analysis reads a layer (issue 26, "an analysis bound by bytes"), and the fused passes.

A counting runner wraps the real :class:`kscale.analysis.stream.Runner` (``run.Runner`` replaced for the
run): every ``map_reduce`` is one pass over a layer's joint blocks, and its tasks add up the bytes of the
blocks they were handed; ``compute`` (the probes' reads) adds up the arrays it returns from dask objects;
the subsample's gathers (``run.read_rows``) are counted apart. Bytes are compared with the layer's: every
selected head's keys of both modalities plus their sample ids.

Claims (``run._FUSE_PASSES``, private, False: the direction sums in a pass of their own, as before):
per layer, one pass per head group (+ one for heads pooled when the heads are split) with the direction
sums riding along, then one pass for the directions' RF MMD; before, one more pass for the direction sums.
The tables (``results.csv``, ``directions.csv``) are byte-identical either way. The probes score every
comparison in one pass (``probes._score_sums``), with the rows of a scoring per comparison.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dask.base import is_dask_collection

from analysis_fakes import make_store
from test_analysis_streaming import write_store
from kscale.analysis import run as R
from kscale.analysis.stream import FusedMerge, Runner, fused_map
from kscale.spec import load_spec
from kscale.spec.analyze import AnalyzeConfig, DaskConfig, EmbedConfig, JSDConfig, MMDConfig, SignificanceConfig

ROOT = Path(__file__).resolve().parents[3]


def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(v) for v in obj)
    return 0


class Counter:
    """What one analysis read, pass by pass: ``passes`` = [(map functions, blocks, bytes)]."""

    def __init__(self):
        self.passes: list[list] = []
        self.compute_bytes = 0
        self.subsample_bytes = 0
        self.lock = threading.Lock()

    def runner(self):
        counter = self

        class CountingRunner(Runner):
            def map_reduce(self, fn, items, shared, merge):
                names = tuple(f.__name__ for f, _ in shared.parts) if fn is fused_map else (fn.__name__,)
                record = [names, len(items), 0]
                counter.passes.append(record)

                def counted(item, sh):
                    with counter.lock:
                        record[2] += _nbytes(item)
                    return fn(item, sh)

                return super().map_reduce(counted, items, shared, merge)

            def compute(self, *objs):  # reads: results of dask objects (not arrays read before and handed in)
                out = super().compute(*objs)
                counter.compute_bytes += sum(_nbytes(o) for i, o in zip(objs, out) if is_dask_collection(i))
                return out

        return CountingRunner

    def read_rows(self, real):
        def counted(x, index, *a, **k):  # bytes as stored (the subsample is handed on as float64)
            out = real(x, index, *a, **k)
            self.subsample_bytes += out.size * x.dtype.itemsize
            return out
        return counted


def layer_bytes(ks, layer: int, heads: list[int]) -> int:
    """Keys of ``heads`` and sample ids (int64) of both modalities: what one pass over them reads."""
    return sum(ks.keys(layer, m, heads).nbytes + 8 * ks.keys(layer, m).shape[0] for m in ("image", "text"))


def counted_run(cfg: AnalyzeConfig, ks, out: Path, monkeypatch, fuse: bool = True, tables_only: bool = False,
                ) -> Counter:
    """``analyze`` with the counters; ``tables_only``: without the pictures and report.html (they read no
    blocks: the tables and the subsample's maps)."""
    from kscale.analysis import figures, report

    counter = Counter()
    with monkeypatch.context() as mp:
        if tables_only:
            mp.setattr(figures, "write_pictures", lambda *a, **k: None)
            mp.setattr(report, "build_report", lambda *a, **k: None)
        mp.setattr(R, "Runner", counter.runner())
        mp.setattr(R, "read_rows", counter.read_rows(R.read_rows))
        mp.setattr(R, "_FUSE_PASSES", fuse)
        R.analyze(cfg, out, stores=[ks])
    return counter


def default_cfg() -> AnalyzeConfig:
    """The defaults (every estimator and comparison, 18 RF configs of 4,096 features, 1,000 permutations,
    probes, paper mode), without pictures (they read no blocks: the subsample), synchronous tasks."""
    return AnalyzeConfig(stores=["unused"], embed=EmbedConfig(methods=[]), dask=DaskConfig(scheduler="sync"))


def demo_cfg() -> AnalyzeConfig:
    cfg = load_spec(ROOT / "jobs" / "demo_analyze.yaml").analyze
    return dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, methods=[]),
                               dask=dataclasses.replace(cfg.dask, scheduler="sync"))


@pytest.mark.parametrize("which,fuse", [
    ("default", True), pytest.param("default", False, marks=pytest.mark.slow), ("demo", True), ("demo", False)])
def test_passes_and_bytes_per_layer(which, fuse, tmp_path, monkeypatch):
    """Both configs split a layer's heads (18 RF configs x 32 buckets x 4,096 features (defaults) or 512 (the
    demo, with a budget of 32 MB): each head's sums alone fill ``mmd.max_accumulator_mb`` over the window),
    so a layer is read by one pass per head (its keys only) and one for heads pooled (all heads): two layers
    of keys. The direction sums now ride along, and one pass (the directions' RF MMD) follows: 3 layers of
    keys per layer, one full read less than before (4). The probes read this small layer once
    (``<= dask.chunk_mb``), and the subsample gathers all of it (a subsample has more rows than it: on a real
    store a few thousand rows per modality)."""
    ks = make_store(n_samples=12, layers=(0,), n_heads=2, head_dim=8)
    cfg = default_cfg() if which == "default" else demo_cfg()
    c = counted_run(cfg, ks, tmp_path / "out", monkeypatch, fuse, tables_only=True)
    full = layer_bytes(ks, 0, [0, 1])
    mmd = ("chunk_sums", "direction_sums") if fuse else ("chunk_sums",)
    want = [(mmd, layer_bytes(ks, 0, heads)) for heads in ([0], [1], [0, 1])]  # groups [[0], [1]], then pooled
    want += [] if fuse else [(("direction_sums",), full)]
    want += [(("direction_mmd_sums",), full)]
    assert [(names, nbytes) for names, _, nbytes in c.passes] == want
    ids = 8 * sum(ks.keys(0, m).shape[0] for m in ("image", "text"))  # every pass reads the sample ids too
    keys_read = (sum(b for _, b in want) - len(want) * ids) / (full - ids)  # in layers of keys
    assert keys_read == 2 + (1 if fuse else 2)
    assert c.compute_bytes == full  # the probes: the small layer read once
    assert c.subsample_bytes == full  # the fake's layer is smaller than a subsample: gathered whole
    print(f"\n{which} {'fused' if fuse else 'separate'}: {len(c.passes)} map_reduce passes per layer, "
          f"{keys_read:g} layers of keys; probes {c.compute_bytes / full:g}; subsample {c.subsample_bytes / full:g}")


@pytest.mark.slow  # ~30 s under load: a measurement (docs/scale.md), not a guarantee of this change
def test_probe_reads_of_a_layer_larger_than_chunk_mb(tmp_path, monkeypatch):
    """The probes' own reads (not map-reduces: sequential Adam steps over block pairs in a seeded order, then
    held-out scoring with the trained probes) of a layer above ``dask.chunk_mb``, with the defaults'
    comparisons and epochs: each epoch reads 3 layers (cross: image + text; intra_text: text on both sides;
    intra_image: image on both sides), 3 epochs, then one scoring pass for all comparisons (before: one per
    comparison, the same 3 layers again): 10 layers of reads per layer (before: 12) while
    ``jsd.max_train_tokens`` (200,000 per modality and epoch) is not reached."""
    ks = make_store(n_samples=700, layers=(0,), n_heads=1, head_dim=64, image_per_sample=12,
                    text_per_sample=(8, 12), chunk_rows=2000)
    full = layer_bytes(ks, 0, [0])
    assert full > 2**20
    cfg = AnalyzeConfig(stores=["unused"], estimators=["jsd_clf"], embed=EmbedConfig(methods=[]),
                        dask=DaskConfig(scheduler="sync", chunk_mb=1),
                        jsd=JSDConfig(classifiers=["logistic"], min_steps=1, max_passes=1),
                        mmd=MMDConfig(max_accumulator_mb=4))
    c = counted_run(cfg, ks, tmp_path / "out", monkeypatch, tables_only=True)
    assert [names for names, _, _ in c.passes] == [("chunk_sums", "direction_sums"), ("direction_mmd_sums",)]
    assert c.compute_bytes == 10 * full
    print(f"\nprobes (defaults' comparisons and epochs) over a layer > chunk_mb: {c.compute_bytes / full:g} "
          f"layers read; map_reduce passes {len(c.passes)}")


def fake_store():
    return make_store(n_samples=60, layers=(0, 2), n_heads=2, head_dim=8, shift=0.8)


def small_cfg(split: bool, scheduler: str = "sync") -> AnalyzeConfig:
    """RF (two normalisations), linear and histogram rows over several joint blocks; ``split``: each head its
    own group and heads pooled in a pass of their own (the accumulator budget fits one head at a time)."""
    mmd = MMDConfig(n_features=512 if split else 256, median_subsample=100, max_accumulator_mb=2,
                    bandwidth_multiples=[1.0], kernels=["rbf", "linear"],
                    normalisations=["none", "l2" if split else "standardize"])
    return AnalyzeConfig(stores=["unused"], estimators=["mmd_rf", "mmd_exact", "jsd_hist"], mmd=mmd,
                         embed=EmbedConfig(methods=[]), dask=DaskConfig(scheduler=scheduler), exact_subsample=50,
                         jsd=JSDConfig(bins=4), significance=SignificanceConfig(n_buckets=4, permutations=20))


@pytest.mark.parametrize("case", ["one-group", "split", "threads", "zarr"])
def test_fused_tables_equal_the_separate_passes_byte_for_byte(case, tmp_path, monkeypatch):
    """results.csv and directions.csv of the fused run equal those of the run with the direction sums in a
    pass of their own, byte for byte: each part's sums are computed from the same blocks and merged in the
    same order. With the heads in one group and split (head groups + pooled), on dask's threads, and on a
    Zarr store (blocks of whole shards from its index)."""
    ks = write_store(tmp_path / "s", n_shards=20) if case == "zarr" else fake_store()
    cfg = small_cfg(split=case == "split", scheduler="threads" if case == "threads" else "sync")
    layer = ks.layers[0]
    with Runner(cfg.dask) as runner:
        lc = R._layer_context(R._store_context(cfg, ks, runner, None), layer, False)
        groups, n_blocks = R._head_groups(lc, True), lc.store.blocks.n_blocks
    assert n_blocks >= 3
    assert len(groups) == (2 if case == "split" else 1)
    runs = {fuse: counted_run(cfg, ks, tmp_path / str(fuse), monkeypatch, fuse, tables_only=True)
            for fuse in (True, False)}
    assert len(runs[True].passes) == len(runs[False].passes) - len(ks.layers)  # one direction pass less per layer
    for name in ("results.csv", "directions.csv"):
        fused, separate = ((tmp_path / str(f) / name).read_bytes() for f in (True, False))
        assert fused == separate, name
    table = pd.read_csv(tmp_path / "True" / "directions.csv")
    assert set(table["head"]) == {*ks.heads, R.POOLED} and table.mmd2_rf.notna().any()
    assert pd.read_csv(tmp_path / "True" / "results.csv").value.notna().all()


def _ints(item, shared):
    return {"sum": sum(item) * shared, "calls": 1}


def _merge_ints(a, b):
    return {"sum": a["sum"] + b["sum"], "calls": a["calls"] + b["calls"]}


def _lists(item, shared):
    return [item + shared]


def _concat(a, b):
    return a + b


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_map_reduce_fused_is_one_pass_with_each_parts_own_result(scheduler):
    """Every part sees every item once, in one task per item (one read), and returns what its own
    map_reduce returns; the merges stay with their parts (one order-dependent merge among them)."""
    items = [(i, i + 1) for i in range(11)]
    seen = []

    class Seen(Runner):
        def map_reduce(self, fn, its, shared, merge):
            seen.append((fn, len(its)))
            return super().map_reduce(fn, its, shared, merge)

    with Seen(DaskConfig(scheduler=scheduler)) as runner:
        fused = runner.map_reduce_fused(items, [(_ints, 3, _merge_ints), (_lists, (7,), _concat)])
        assert seen == [(fused_map, 11)]
        alone = (runner.map_reduce(_ints, items, 3, _merge_ints), runner.map_reduce(_lists, items, (7,), _concat))
    assert fused == alone
    assert fused[0] == {"sum": 3 * sum(map(sum, items)), "calls": 11}
    assert fused[1] == [it + (7,) for it in items]
    with pytest.raises(ValueError):  # a part without its merge is an error, not a silent drop
        FusedMerge((_concat,))((1, 2), (3, 4))


def test_probe_scoring_is_one_pass_for_every_comparison_with_the_same_rows():
    """The probes' held-out scoring reads each block once for all comparisons (cross, intra_text,
    intra_image: 1 layer), where a scoring pass per comparison right after its training reads 2 layers (3
    before this change: an intra comparison's modality was read once per side); the rows equal those of
    that order (train, score, next comparison) exactly."""
    from kscale.analysis import probes as P

    ks = make_store(n_samples=16, layers=(0,), n_heads=2, head_dim=8)
    cfg = AnalyzeConfig(stores=["unused"], estimators=["jsd_clf"], embed=EmbedConfig(methods=[]),
                        dask=DaskConfig(scheduler="sync"), mmd=MMDConfig(median_subsample=100, max_accumulator_mb=1),
                        jsd=JSDConfig(classifiers=["logistic", "mlp"], mlp_hidden=8, epochs=1, min_steps=4),
                        significance=SignificanceConfig(n_buckets=8))
    counter = Counter()
    with counter.runner()(cfg.dask) as runner:
        lc = R._layer_context(R._store_context(cfg, ks, runner, None), 0, False)
        sc, joint = lc.store, R.layer_items(lc, lc.store.heads)
        assert len(joint) >= 2 and len(sc.comps) == 3
        items = {m: [it[m] for it in joint if it[m] is not None] for m in sc.mods}
        targets = {t: (pos, lc.plans[t]) for t, pos in lc.targets.items()}
        n_samples = {c.name: 1 for c in sc.comps}

        def ctx_rows(t):
            return lambda **kw: {"head": t, **kw}

        before, reads_before = [], 0
        for comp in sc.comps:  # the order before: each comparison trained, then scored alone
            job = (comp, P._train(cfg, runner, items, comp, targets, sc.buckets))
            read = counter.compute_bytes
            [(loss, count)] = P._score_sums(cfg, runner, items, [job], targets, sc.buckets)
            reads_before += counter.compute_bytes - read
            before += P._score_rows(cfg, comp, targets, job[1][0], loss, count, ctx_rows)
        trained = [(comp, P._train(cfg, runner, items, comp, targets, sc.buckets)) for comp in sc.comps]
        read = counter.compute_bytes
        sums = P._score_sums(cfg, runner, items, trained, targets, sc.buckets)
        reads_now = counter.compute_bytes - read
        now = [r for (comp, (train_K, _)), (loss, count) in zip(trained, sums)
               for r in P._score_rows(cfg, comp, targets, train_K, loss, count, ctx_rows)]
        stage = P.probe_rows(lc, n_samples, joint)  # the stage's own entry (the small layer read once first)
    full = layer_bytes(ks, 0, [0, 1])
    assert (reads_before, reads_now) == (2 * full, full)
    assert len(now) == 3 * 3 * 2 and repr(now) == repr(before)  # comparisons x targets x kinds, same numbers
    assert repr([(r["comparison"], r["head"], r["value"], r["se"], r["p"]) for r in stage]) == repr([
        (r["comparison"], r["head"], r["value"], r["se"], r["p"]) for r in now])
    assert all(r["se"] > 0 and np.isfinite(r["value"]) for r in now if r["comparison"] == "cross")
