"""A coarse read (``keys_rows`` / ``column_rows`` / the gathers of ``keys_at``) is one dask task whose
arguments dask does not walk: building it costs the same whatever the number of shards it spans
(docs/scale.md: walking ~100 spans per task cost more than reading them), and it reads what the lazy
arrays hold."""

import importlib
import pickle

import numpy as np

import kscale.store
from tests.unit.test_store_v2 import make_store


def walks(monkeypatch) -> list:
    """Calls of dask's argument walker (``dask.delayed.unpack_collections``), recorded."""
    module = importlib.import_module("dask.delayed")  # the module (``dask.delayed`` is the function)
    calls, real = [], module.unpack_collections

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, "unpack_collections", counting)
    return calls


def test_building_a_coarse_read_does_not_walk_its_spans(tmp_path, monkeypatch):
    small = kscale.store.open(make_store(tmp_path / "small", n_shards=2, chunk=3))
    large = kscale.store.open(make_store(tmp_path / "large", n_shards=12, chunk=3))
    calls = walks(monkeypatch)
    counts = []
    for ks in (small, large):
        n = ks.n_tokens()["image"]
        before = len(calls)
        ks.keys_rows(5, "image", 0, n, [2, 0])
        ks.column_rows("image", "sample_id", 0, n)
        counts.append(len(calls) - before)
    assert len(large.spans("image", 0, large.n_tokens()["image"])) == 12
    assert counts[0] == counts[1] <= 12, counts  # walking the spans: ~8 calls per span


def test_coarse_reads_equal_the_lazy_arrays_and_travel(tmp_path):
    ks = kscale.store.open(make_store(tmp_path / "s", n_shards=5, chunk=3))
    for m in ("text", "image"):
        n = ks.n_tokens()[m]
        keys, ids = ks.keys(3, m, [1]).compute(), ks.token_column(m, "sample_id").compute()
        task = ks.keys_rows(3, m, 1, n - 1, [1])
        assert task.compute().tobytes() == keys[1:n - 1].tobytes()
        assert pickle.loads(pickle.dumps(task)).compute().tobytes() == keys[1:n - 1].tobytes()  # to a worker
        np.testing.assert_array_equal(ks.column_rows(m, "sample_id", 0, n).compute(), ids)
        index = np.random.default_rng(0).integers(0, n, 2 * n)
        assert ks.keys_at(3, m, index, [1]).tobytes() == keys[index].tobytes()
