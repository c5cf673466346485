"""Streaming from a Zarr store equals in-memory computation, with memory independent of the store size."""

import tracemalloc

import dask.array as da
import numpy as np
import pytest
import zarr

from kscale.spec.analyze import DaskConfig
from kscale.analysis.features import chunk_sums, merger, single_target_plan
from kscale.analysis.mmd import rf_mmd2, rf_side
from kscale.analysis.source import block_plan, joint_items, rows_per_block
from kscale.analysis.stream import Runner


def write_keys(path, n, heads, d, seed, shift):
    arr = zarr.create_array(str(path), shape=(n, heads, d), chunks=(16384, heads, d), dtype="float16")
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 262144):
        x = rng.standard_normal((min(262144, n - lo), heads, d)).astype(np.float16)
        x[:, :, 0] += shift
        arr[lo:lo + len(x)] = x
    return arr


def streamed_value(x_img, x_txt, sid_img, sid_txt, plan, scheduler="threads", chunk_mb=4):
    """Token-level RF MMD^2 of two modalities streamed as sample-aligned joint blocks."""
    keys = {"img": x_img, "txt": x_txt}
    ids = {m: da.from_array(s, chunks=(keys[m].chunks[0],)) for m, s in (("img", sid_img), ("txt", sid_txt))}
    row_bytes = int(np.prod(x_img.shape[1:])) * x_img.dtype.itemsize
    items = joint_items(keys, ids, block_plan(ids, rows_per_block(chunk_mb, row_bytes), 4096, "test"))
    with Runner(DaskConfig(scheduler=scheduler, n_workers=2, chunk_mb=chunk_mb)) as runner:
        ts = runner.map_reduce(chunk_sums, items, plan, merger(0))[0]
    sides = [rf_side(s.count_K, s.rf_KC2D[:, 0], s.rfself_KCD[:, 0], s.nsq_K) for s in ts.by_mod.values()]
    return rf_mmd2(*sides, estimator="token")[0]


def test_out_of_core_equals_in_memory_with_bounded_memory(tmp_path):
    n, heads, d = 700_000, 2, 32  # 2 x 90 MB of fp16 keys on disk
    z_img = write_keys(tmp_path / "img.zarr", n, heads, d, 0, 0.3)
    z_txt = write_keys(tmp_path / "txt.zarr", n, heads, d, 1, 0.0)
    sid = np.repeat(np.arange(n // 100), 100)
    sid_txt = sid + n
    plan = single_target_plan(d, n_features=128, bandwidth=8.0, sample_ids=np.concatenate([sid, sid_txt]),
                              n_buckets=8)
    store_bytes = 2 * n * heads * d * 2
    warm = da.from_zarr(z_img)[:1000]  # one-time imports (dask's schedulers) are not data
    streamed_value(warm, warm, sid[:1000], sid_txt[:1000], plan)
    tracemalloc.start()
    got = streamed_value(da.from_zarr(z_img), da.from_zarr(z_txt), sid, sid_txt, plan)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < store_bytes / 4, (peak / 2**20, store_bytes / 2**20)
    sub = slice(0, 200_000)  # in-memory reference on a part that fits, chunked differently
    ref_img, ref_txt = np.asarray(z_img[sub]), np.asarray(z_txt[sub])
    in_mem = streamed_value(da.from_array(ref_img, chunks=(7_777, heads, d)),
                            da.from_array(ref_txt, chunks=(50_000, heads, d)), sid[sub], sid_txt[sub], plan)
    on_disk = streamed_value(da.from_zarr(z_img)[sub], da.from_zarr(z_txt)[sub], sid[sub], sid_txt[sub], plan)
    assert on_disk == pytest.approx(in_mem, rel=1e-9)
    assert got > 0


@pytest.mark.cluster
def test_distributed_local_cluster_equals_threads(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20_000, 1, 8)).astype(np.float32)
    y = rng.standard_normal((20_000, 1, 8)).astype(np.float32) + 0.2
    sid = np.repeat(np.arange(200), 100)
    plan = single_target_plan(8, n_features=64, bandwidth=3.0, sample_ids=np.arange(400), n_buckets=4)
    xa, ya = da.from_array(x, chunks=(3000, 1, 8)), da.from_array(y, chunks=(3000, 1, 8))
    threads = streamed_value(xa, ya, sid, sid + 200, plan, chunk_mb=1)
    dist = streamed_value(xa, ya, sid, sid + 200, plan, scheduler="distributed", chunk_mb=1)
    assert dist == pytest.approx(threads, rel=1e-9)


@pytest.mark.parametrize("store", [pytest.param("fake", marks=pytest.mark.extended), "real"])
def test_distributed_analysis_equals_threaded(tmp_path, store):
    """A dask.distributed LocalCluster of 2 worker processes gives the threaded run's table (mergeable sums):
    over dask arrays (a fake store) and over a real store's coarse reads (tasks carry their shards' spans)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from analysis_fakes import make_store
    from test_analysis_streaming import write_store

    from kscale.analysis.run import analyze

    ks = (make_store(n_samples=24, layers=(0,), n_heads=2, head_dim=6, chunk_rows=40) if store == "fake"
          else write_store(tmp_path / "store", chunk_tokens=4, n_shards=8, per_shard=3))

    def run(scheduler, name):
        return analyze(small_analysis_cfg(DaskConfig(scheduler=scheduler, n_workers=2, chunk_mb=1)),
                       tmp_path / name, stores=[ks])

    assert_same_table(run("distributed", "d"), run("threads", "t"))


def small_analysis_cfg(dask_cfg: DaskConfig):
    """Layer 0, RF MMD and histogram JSD, no pictures: the analysis the distributed tests run
    (also tests/cluster/test_dask_nodes.py); chunk_mb=1 gives ~6 blocks on the small stores."""
    from kscale.spec.analyze import AnalyzeConfig, EmbedConfig, MMDConfig, SignificanceConfig

    return AnalyzeConfig(stores=["unused"], layers=[0], estimators=["mmd_rf", "jsd_hist"],
                         mmd=MMDConfig(n_features=64, median_subsample=100, max_accumulator_mb=1),
                         significance=SignificanceConfig(n_buckets=8, permutations=0),
                         embed=EmbedConfig(methods=[]), dask=dask_cfg)


def assert_same_table(got, want):
    """Same rows, every number to 1e-9 relative (the sums are mergeable: order does not matter)."""
    assert len(got) == len(want) > 0
    for col in ("value", "se", "ci_low", "ci_high", "p"):
        np.testing.assert_allclose(got[col].astype(float), want[col].astype(float), rtol=1e-9, atol=1e-15)
