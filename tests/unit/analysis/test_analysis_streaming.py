"""Streamed sample ids: the reader's lazy token columns, sample-aligned joint blocks, and rows equal to a
reference that loads every token's sample id and all keys in memory (the path the stage used before)."""

import dataclasses
import tracemalloc

import dask
import numpy as np
import pandas as pd
import pytest
import zarr

import kscale.store
from kscale.spec.analyze import AnalyzeConfig, DaskConfig, EmbedConfig, MMDConfig, SignificanceConfig
from kscale.analysis.features import draw_frequencies
from kscale.analysis.run import analyze
from kscale.analysis.source import block_plan, index_block_plan
from kscale.store.layout import STORE_FORMAT
from kscale.store.writer import ShardWriter

D_HEAD, HEADS, D_FREQ = 6, 2, 64


def write_store(path, chunk_tokens=5, n_shards=3, per_shard=4, seed=0):
    """A real store: samples of 3-9 image and 2-7 text tokens, chunks that cut samples in two."""
    g = zarr.open_group(str(path), mode="w")
    g.attrs.update({"format": STORE_FORMAT, "layers": [0, 1], "heads": list(range(HEADS)), "head_dim": D_HEAD,
                    "key_dtype": "float32", "rope_rows": 1})
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        w = ShardWriter(path, f"s{s:06d}", n_layers=2, n_heads=HEADS, head_dim=D_HEAD, rope_rows=1,
                        key_dtype="float32", chunk_tokens=chunk_tokens)
        for i in range(per_shard):
            sid = s * per_shard + i
            for mod, (lo, hi), shift in (("image", (3, 10), 0.7), ("text", (2, 8), 0.0)):
                n = int(rng.integers(lo, hi))
                k = rng.standard_normal((2, n, HEADS, D_HEAD)).astype("float32") + rng.standard_normal(D_HEAD)
                k[..., 0] += shift
                w.append(mod, k, {"sample_id": np.full(n, sid, "int64"), "position": np.arange(n, dtype="int32"),
                                  "rope_pos": np.zeros((n, 1), "int32"), "token_id": np.zeros(n, "int32"),
                                  "image_index": np.zeros(n, "int16")})
        w.commit({"n_samples_ok": per_shard}, [])
    return kscale.store.open(path)


def test_token_column_is_lazy_and_aligned_with_keys(tmp_path):
    ks = write_store(tmp_path / "s")
    for mod in ("image", "text"):
        col = ks.token_column(mod, "sample_id")
        assert col.chunks[0] == ks.keys(0, mod).chunks[0]
        np.testing.assert_array_equal(col.compute(), ks.tokens(mod)["sample_id"])
    assert ks.token_column("video", "sample_id").shape == (0,)
    with pytest.raises(kscale.store.StoreError, match="unknown token column"):
        ks.token_column("text", "nope")


@pytest.mark.parametrize("planner", ["stream", "index"])
@pytest.mark.parametrize("max_rows,max_samples", [(20, 3), (1000, 5), (1, 1)])
def test_joint_blocks_hold_whole_samples(tmp_path, planner, max_rows, max_samples):
    """Streamed ids (any store) or the index (whole shards, a shard cut into samples only when it alone
    exceeds a block: here 4 samples per shard)."""
    ks = write_store(tmp_path / "s")
    cols = {m: ks.token_column(m, "sample_id") for m in ("image", "text")}
    plan = (block_plan(cols, max_rows, max_samples, "test") if planner == "stream"
            else index_block_plan(ks, ["image", "text"], max_rows, max_samples, "test"))
    for mod, col in cols.items():
        ids = col.compute()
        edges = np.cumsum((0,) + plan.rows[mod])
        assert edges[-1] == len(ids)
        blocks = [set(ids[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        assert all(not (a & b) for i, a in enumerate(blocks) for b in blocks[i + 1:])  # no sample in two
        assert all(len(b) <= max_samples for b in blocks)
    if planner == "index" and max_samples == 5:  # shards of 4 samples fit: blocks are whole shards
        assert plan.n_blocks == 3


def many_tiny_shards(path):
    return write_store(path, chunk_tokens=4, n_shards=12, per_shard=2, seed=3)


def test_a_block_reads_a_run_of_shards_in_one_task(tmp_path):
    """Graph size follows the blocks, not the shards: 2 tasks (keys, sample ids) per block and modality."""
    from kscale.analysis.source import joint_items, range_items

    ks = many_tiny_shards(tmp_path / "s")
    plan = index_block_plan(ks, ["image", "text"], 10**6, 5, "test")
    assert plan.n_blocks == 6  # 12 shards of 2 samples, at most 5 samples a block: 2 whole shards each
    items = range_items(ks, 1, [0, 1], plan)
    tasks = {k for it in items for v in it.values() for d in v for k in d.__dask_graph__()}
    assert len(tasks) == 2 * 2 * plan.n_blocks
    per_shard = joint_items({m: ks.keys(1, m, [0, 1]) for m in plan.rows},
                            {m: ks.token_column(m, "sample_id") for m in plan.rows}, plan)
    assert len({k for it in per_shard for v in it.values() for d in v for k in d.__dask_graph__()}) > len(tasks)
    for m in plan.rows:  # and the blocks' rows are the store's rows
        got = np.concatenate([dask.compute(it[m][0])[0] for it in items])
        np.testing.assert_array_equal(got, ks.keys(1, m, [0, 1]).compute())
    one_per_sample = index_block_plan(ks, ["image", "text"], 10**6, 1, "test")
    tracemalloc.start()
    lazy = range_items(ks, 1, [0, 1], one_per_sample)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(lazy) == 24 and used < 100 * len(lazy)  # items are built on demand (a block's reads: ~8 KB)


def test_rows_of_many_blocks_equal_a_one_block_run(tmp_path):
    """Many tiny shards read in coarse blocks of several shards: the same table as one block holding
    the whole store (mergeable sums: equal up to summation order)."""
    from kscale.analysis.run import _store_context
    from kscale.analysis.stream import Runner

    ks = many_tiny_shards(tmp_path / "s")

    def run(accumulator_mb, name):
        cfg = cfg_for("block")
        cfg = dataclasses.replace(cfg, estimators=["mmd_rf", "jsd_hist"], comparisons=["cross"],
                                  mmd=dataclasses.replace(cfg.mmd, max_accumulator_mb=accumulator_mb))
        n_blocks = _store_context(cfg, ks, Runner(cfg.dask), None).blocks.n_blocks
        return n_blocks, analyze(cfg, tmp_path / name, stores=[ks])

    (many, a), (one, b) = run(1, "many"), run(4096, "one")
    assert many >= 4 and one == 1
    assert len(a) == len(b) > 0
    for col in ("value", "se", "ci_low", "ci_high"):
        np.testing.assert_allclose(a[col].astype(float), b[col].astype(float), rtol=1e-12, atol=1e-15)


def cfg_for(estimator, **kw):
    return AnalyzeConfig(stores=["unused"], estimators=["mmd_rf"], pooled=False, comparisons=["cross"],
                         mmd=MMDConfig(n_features=D_FREQ, estimator=estimator, median_subsample=50,
                                       compute_dtype="float64"),
                         significance=SignificanceConfig(n_buckets=4, permutations=0),
                         embed=EmbedConfig(methods=[]), dask=DaskConfig(chunk_mb=1), **kw)


def reference_value(ks, layer, head, row, estimator):
    """The row's value from every token's sample id and all keys in memory (no streaming, no buckets)."""
    heads = list(range(HEADS)) if head == -1 else [head]  # pooled: every head's vector is one more point
    ids = {m: np.repeat(ks.tokens(m)["sample_id"], len(heads)) for m in ("image", "text")}
    x = {m: ks.keys(layer, m).compute()[:, heads].astype(np.float64).reshape(-1, D_HEAD)
         for m in ("image", "text")}
    if row.kernel == "linear":
        feats = x
    else:
        f = draw_frequencies(D_HEAD, D_FREQ, orthogonal=True, seed=0)
        w_Dd = f.directions_Dd * (f.radii[row.kernel] / row.bandwidth)[:, None]
        feats = {m: np.hstack([np.cos(v @ w_Dd.T), np.sin(v @ w_Dd.T)]) / np.sqrt(D_FREQ) for m, v in x.items()}
    gram = {(a, b): feats[a] @ feats[b].T for a in feats for b in feats}
    same = {(a, b): ids[a][:, None] == ids[b][None, :] for a in ids for b in ids}
    total = 0.0
    for (a, b), sign in ((("image", "image"), 1), (("text", "text"), 1), (("image", "text"), -2)):
        if estimator == "block":
            keep = ~same[(a, b)]
        else:
            keep = ~np.eye(len(ids[a]), dtype=bool) if a == b else np.ones(gram[(a, b)].shape, bool)
        total += sign * gram[(a, b)][keep].mean()
    return total


@pytest.mark.parametrize("estimator", ["token", "block"])
def test_streamed_rows_equal_the_in_memory_reference(tmp_path, estimator):
    """Per head and heads pooled; a tiny accumulator budget splits heads into groups of one."""
    ks = write_store(tmp_path / "s")
    cfg = cfg_for(estimator)
    cfg = dataclasses.replace(cfg, pooled=True, mmd=dataclasses.replace(cfg.mmd, max_accumulator_mb=1))
    df = analyze(cfg, tmp_path / "out", stores=[ks])
    rows = df[df.estimator.isin(["mmd2_rf", "mmd2_linear"]) & (df.normalisation == "none")]
    assert len(rows) == 2 * (HEADS + 1) * 7  # layers x (heads, pooled) x (rbf, laplacian at 3 multiples; linear)
    for row in rows.itertuples():
        ref = reference_value(ks, row.layer, row.head, row, estimator)
        assert row.value == pytest.approx(ref, rel=1e-12, abs=1e-14), (row.kernel, row.layer, row.head)


def test_sorted_ids_are_required(tmp_path):
    import dask.array as da

    cols = {"text": da.from_array(np.array([3, 3, 1, 1]), chunks=2)}
    with pytest.raises(ValueError, match="not sorted by sample id"):
        block_plan(cols, 10, 10, "store x")


def test_same_seed_same_bytes_other_seed_moves_every_choice(tmp_path):
    """Seed determinism of the whole table, and that another seed moves each random choice."""
    from analysis_fakes import make_store

    from kscale.spec.analyze import JSDConfig

    ks = make_store(n_samples=32, layers=(0,), n_heads=2, head_dim=6, shift=0.5, text_per_sample=(3, 8))

    def run(seed, name):
        cfg = AnalyzeConfig(stores=["unused"], seed=seed, exact_subsample=60,
                            mmd=MMDConfig(n_features=32, median_subsample=80, normalisations=["none"],
                                          bandwidth_multiples=[1.0]),
                            jsd=JSDConfig(epochs=1, min_steps=5, mlp_hidden=8, n_random=2, n_pca=2),
                            significance=SignificanceConfig(n_buckets=8, permutations=19),
                            embed=EmbedConfig(methods=[]))
        analyze(cfg, tmp_path / name, stores=[ks])
        return (tmp_path / name / "results.csv").read_bytes()

    a, b, _ = run(0, "a"), run(0, "b"), run(2, "c")  # (seed 1 hashes no sample of 32 into held-out bucket 1)
    assert a == b
    da_, dc = pd.read_csv(tmp_path / "a" / "results.csv"), pd.read_csv(tmp_path / "c" / "results.csv")
    key = ["layer", "head", "comparison", "estimator", "kernel", "normalisation", "multiple"]
    m = da_.merge(dc, on=key, suffixes=("_0", "_1"))
    assert len(m) == len(da_)

    def moved(est, col):
        r = m[m.estimator == est]
        return bool((~np.isclose(r[f"{col}_0"], r[f"{col}_1"], rtol=1e-9, equal_nan=True)).any())

    assert moved("mmd2_rf", "bandwidth")  # balanced pool behind the median heuristic
    assert moved("mmd2_paper", "value")  # subsample and pooled-head shuffle
    assert moved("mmd2_rf", "approx_sd")  # frequencies
    assert moved("mmd2_linear", "se")  # buckets
    assert moved("jsd_hist_random", "value") and moved("jsd_hist_marginal", "value")  # directions, bins
    assert moved("jsd_clf_mlp", "value")  # probes


def test_pool_and_pooled_head_shuffle_follow_the_seed():
    """The two choices that once ignored ``analyze.seed``: the balanced pool behind bandwidths,
    standardisation and bins, and the shuffle of pooled heads before truncation."""
    from kscale.analysis.plan import Subsample, balanced_pool, comparisons

    rng = np.random.default_rng(0)
    keys = {m: rng.standard_normal((300, 2, 4)) for m in ("image", "text")}
    ids = {m: np.repeat(np.arange(30), 10) for m in keys}
    sub = Subsample(keys, ids, {m: ids[m] % 4 for m in keys})
    pools = [balanced_pool(sub, [0, 1], "image", 100, seed) for seed in (0, 0, 1)]
    np.testing.assert_array_equal(pools[0], pools[1])
    assert not np.allclose(pools[0], pools[2])
    comp = comparisons(["cross"], "image")[0]
    sides = [sub.side(comp, "x", [0, 1], 50, seed)[0] for seed in (0, 0, 1)]
    np.testing.assert_array_equal(sides[0], sides[1])
    assert not np.allclose(sides[0], sides[2])


def test_shared_bandwidth_policy_makes_two_stores_comparable(tmp_path):
    """Two stores with the same data (samples renumbered: other order, other subsample, other buckets):
    per-target bandwidths differ, so do the values; a reference bandwidth makes them equal."""
    from analysis_fakes import FakeKeyStore, make_store

    a = make_store(n_samples=20, layers=(0,), n_heads=2, head_dim=5, shift=0.6)
    renumber = {m: 1000 - a.tokens_by[m]["sample_id"] for m in ("image", "text")}  # reverses the order
    b = FakeKeyStore({k: v[::-1] for k, v in a.keys_by.items()},
                     {m: {**a.tokens_by[m], "sample_id": renumber[m][::-1]} for m in renumber},
                     a.layers, a.heads, a.head_dim, path="memory://b")

    def cross_values(policy, store, name):
        cfg = AnalyzeConfig(stores=["unused"], estimators=["mmd_rf"], comparisons=["cross"],
                            mmd=MMDConfig(n_features=64, median_subsample=60, compute_dtype="float64",
                                          bandwidth_policy=policy, reference_store="memory://fake"),
                            significance=SignificanceConfig(n_buckets=4, permutations=0),
                            embed=EmbedConfig(methods=[]))
        df = analyze(cfg, tmp_path / name, stores=[a, store] if policy == "reference" and store is b else [store])
        df = df[(df.store == store.path) & df.estimator.isin(["mmd2_rf"])]
        assert set(df.bandwidth_policy) == {policy}
        return df.sort_values(["head", "kernel", "normalisation", "multiple"]).value.to_numpy()

    own = cross_values("per_target", a, "a"), cross_values("per_target", b, "b")
    assert not np.allclose(own[0], own[1], rtol=1e-6)
    shared = cross_values("reference", a, "ra"), cross_values("reference", b, "rb")
    np.testing.assert_allclose(shared[0], shared[1], rtol=1e-9)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_random_features_equal_numpy(device):
    """The torch path (a worker's GPU, or torch on CPU) gives numpy's per-sample sums to 1e-6."""
    import torch

    from kscale.analysis.features import BlockSamples, ChunkPlan, FeatureConfig, TargetPlan, _per_sample_rf
    from kscale.analysis.gpu import per_sample_rf_torch
    from kscale.analysis.source import Buckets

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent GPU machine)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)) * 2
    ids = np.repeat(np.arange(100), 30)
    target = TargetPlan([0], {"none": 5.0, "l2": 0.8, "standardize": 4.0}, rng.standard_normal(16),
                        rng.uniform(0.5, 2, 16))
    configs = [FeatureConfig(n, k, m) for n in ("none", "l2", "standardize") for k in ("rbf", "laplacian")
               for m in (0.5, 1.0)]
    plan = ChunkPlan(draw_frequencies(16, 256, orthogonal=True, seed=1), configs, [], {0: target},
                     Buckets(8, 0), "float32", 512)
    smp = BlockSamples.of(ids)
    ref = _per_sample_rf(plan, target, x, smp)
    got = per_sample_rf_torch(plan, target, x, smp, torch.device(device))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
