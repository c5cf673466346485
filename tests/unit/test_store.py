"""Shard writer/reader: buffered whole-chunk appends give the same data whatever the chunking."""

import numpy as np
import pytest
import zarr

import kscale.store
from kscale.store.layout import STORE_FORMAT, is_store
from kscale.store.writer import ShardWriter


def make_store(path, chunk: int, pieces: list[int]) -> None:
    g = zarr.open_group(str(path), mode="w")
    g.attrs.update({"format": STORE_FORMAT, "layers": [3, 5], "heads": [0, 1, 2], "head_dim": 4,
                    "key_dtype": "float32", "rope_rows": 3})
    rng = np.random.default_rng(0)
    for s, n_parts in enumerate([pieces, pieces[::-1]]):
        w = ShardWriter(path, f"s{s:06d}", n_layers=2, n_heads=3, head_dim=4, rope_rows=3, key_dtype="float32",
                        chunk_tokens=chunk)
        for n in n_parts:
            k = rng.standard_normal((2, n, 3, 4)).astype("float32")
            cols = {"sample_id": np.full(n, s, "int64"), "position": np.arange(n, dtype="int32"),
                    "rope_pos": rng.integers(0, 9, (n, 3)).astype("int32"), "token_id": np.arange(n, dtype="int32"),
                    "image_index": np.zeros(n, "int16")}
            w.append("image", k, cols)
        w.append_table("attention", {"sample_id": np.array([s]), "mass": np.array([0.5])})
        w.commit({"n_samples_ok": 1}, [])


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunking_does_not_change_data(tmp_path, chunk):
    make_store(tmp_path / "ref", 4096, [5, 3, 9, 1])
    make_store(tmp_path / "x", chunk, [5, 3, 9, 1])
    a, b = kscale.store.open(tmp_path / "ref"), kscale.store.open(tmp_path / "x")
    for layer in (3, 5):
        np.testing.assert_array_equal(a.keys(layer, "image").compute(), b.keys(layer, "image").compute())
    assert a.keys(5, "image", heads=[2]).shape == (36, 1, 4)
    for col, v in a.tokens("image").items():
        np.testing.assert_array_equal(v, b.tokens("image")[col])
    assert b.keys(3, "text").shape == (0, 3, 4)
    np.testing.assert_array_equal(b.table("attention")["sample_id"], [0, 1])
    with pytest.raises(kscale.store.StoreError, match="layer 4 is not in store"):
        b.keys(4, "image")


def test_partial_shard_is_invisible_and_replaced(tmp_path):
    make_store(tmp_path / "s", 4, [5])
    (tmp_path / "s" / "shards" / "s000001.done.json").unlink()  # as if killed before the marker
    s = kscale.store.open(tmp_path / "s")
    assert list(s.shards) == ["s000000"] and s.keys(3, "image").shape[0] == 5
    w = ShardWriter(tmp_path / "s", "s000001", n_layers=2, n_heads=3, head_dim=4, rope_rows=3,
                    key_dtype="float32", chunk_tokens=4)  # the rerun: partial dir deleted and rewritten
    w.commit({}, [])
    assert kscale.store.open(tmp_path / "s").keys(3, "image").shape[0] == 5


def test_open_errors(tmp_path):
    with pytest.raises(kscale.store.StoreError, match="no store"):
        kscale.store.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    assert not is_store(tmp_path / "plain")
    with pytest.raises(kscale.store.StoreError, match="not a kscale key store"):
        kscale.store.open(tmp_path / "plain")
