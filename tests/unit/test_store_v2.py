"""Store format 2: v1 stores read as before, the index never changes what is read, damage is named.

Each test writes small synthetic stores through the real writers (``ShardWriter``; the frozen v1 writer
in ``tests/store_v1.py`` for format 1) and reads them back through ``kscale.store.open``.
"""

import json
import os
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import kscale.store
from kscale.cli import main
from kscale.store.index import build_index, load_index, write_index
from kscale.store.layout import INDEX_FILE, STORE_FORMAT, marker_path, shard_dir
from kscale.store.reader import KeyStore, StoreDamaged
from kscale.store.verify import verify_store
from kscale.store.writer import ShardCommitted, ShardWriter
from tests.store_v1 import ShardWriterV1

L, H, D, R = 2, 3, 4, 3
LAYERS = [3, 5]


def shard_data(s: int, modality: str, n: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(1000 * s + len(modality))
    k = rng.standard_normal((L, n, H, D)).astype("float16")
    cols = {"sample_id": np.repeat(np.arange(3 * s, 3 * s + 3), n)[:n].astype("int64"),
            "position": np.arange(n, dtype="int32"), "rope_pos": rng.integers(0, 99, (n, R)).astype("int32"),
            "token_id": rng.integers(0, 5000, n).astype("int32"),
            "image_index": (np.zeros(n) if modality == "image" else -np.ones(n)).astype("int16")}
    return k, cols


def write_shard(path, s: int, writer=ShardWriter, chunk: int = 4) -> None:
    errors = [{"sample_id": 3 * s + 2, "source_id": "x", "reason": "bad"}] if s == 1 else []
    w = writer(path, f"s{s:06d}", n_layers=L, n_heads=H, head_dim=D, rope_rows=R, key_dtype="float16",
               chunk_tokens=chunk)
    for modality, n in (("text", 5 + s % 3), ("image", 9 + 2 * s)):
        for part in np.array_split(np.arange(n), 2):  # two appends per modality, not chunk-aligned
            k, cols = shard_data(s, modality, n)
            w.append(modality, k[:, part], {c: v[part] for c, v in cols.items()})
    w.append_table("attention", {"sample_id": np.array([3 * s]), "mass": np.array([0.25 * s])})
    w.commit({"shard": f"s{s:06d}", "start": 3 * s, "stop": 3 * s + 3, "n_samples": 3,
              "n_samples_ok": 3 - len(errors), "n_errors": len(errors)}, errors)


def make_store(path, n_shards: int = 3, writer=ShardWriter, version: int = 2, chunk: int = 4) -> str:
    g = zarr.open_group(str(path), mode="w")
    g.attrs.update({"format": STORE_FORMAT, "version": version, "layers": LAYERS, "heads": [0, 1, 2],
                    "head_dim": D, "key_dtype": "float16", "rope_rows": R, "plan": {"n_shards": n_shards}})
    for s in range(n_shards):
        write_shard(path, s, writer, chunk)
    return str(path)


def expected(n_shards: int, modality: str) -> tuple[np.ndarray, dict]:
    """What was written, concatenated in shard order: the reference every read is compared to."""
    n = {"text": lambda s: 5 + s % 3, "image": lambda s: 9 + 2 * s}[modality]
    parts = [shard_data(s, modality, n(s)) for s in range(n_shards)]
    return (np.concatenate([k for k, _ in parts], axis=1),
            {c: np.concatenate([p[1][c] for p in parts]) for c in parts[0][1]})


def read_all(ks: KeyStore) -> dict:
    out = {}
    for m in ("text", "image", "video"):
        for layer in LAYERS:
            out[("keys", layer, m)] = ks.keys(layer, m).compute()
        out[("heads", m)] = ks.keys(5, m, heads=[2, 0]).compute()
        for c, v in ks.tokens(m).items():
            out[("tokens", m, c)] = v
    out["table"] = ks.table("attention")
    out["errors"] = ks.errors()
    out["summary"] = {k: v for k, v in ks.summary().items() if k not in ("disk_bytes", "version", "path")}
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
        elif k == "table":
            assert a[k].keys() == b[k].keys() and all(np.array_equal(a[k][c], b[k][c]) for c in a[k])
        else:
            assert a[k] == b[k], k


def test_v1_store_reads_as_written_and_as_v2(tmp_path):
    v1 = kscale.store.open(make_store(tmp_path / "v1", writer=ShardWriterV1, version=1))
    v2 = kscale.store.open(make_store(tmp_path / "v2"))
    assert all(r["layout"] == 1 for r in v1.shards.values()) and all(r["layout"] == 2 for r in v2.shards.values())
    for m in ("text", "image"):
        keys_LNHD, cols = expected(3, m)
        for li, layer in enumerate(LAYERS):
            got = v1.keys(layer, m).compute()
            assert got.dtype == np.float16 and got.tobytes() == keys_LNHD[li].tobytes()
        t = v1.tokens(m)
        for c, dt in kscale.store.layout.TABLE_COLUMNS.items():  # a store older than the video columns: -1
            want = cols[c] if c in cols else np.full(len(cols["sample_id"]), kscale.store.layout.COLUMN_FILL)
            assert t[c].dtype == dt and np.array_equal(t[c], want), c
        assert np.array_equal(v1.token_column(m, "sample_id").compute(), cols["sample_id"])
    assert v1.summary()["samples"] == 8 and v1.summary()["errors"] == 1 and v1.errors()[0]["sample_id"] == 5
    assert_same(read_all(v1), read_all(v2))
    assert v1.keys(3, "video").shape == (0, 3, 4) and v1.tokens("video")["rope_pos"].shape == (0, 3)


@pytest.mark.parametrize("writer,version", [(ShardWriter, 2), (ShardWriterV1, 1)])
def test_coarse_reads_equal_the_lazy_arrays(tmp_path, writer, version):
    """``keys_rows`` / ``column_rows`` (one task over a run of shards) and ``keys_at`` / ``column_at``
    (gathers in a few tasks) give the rows of ``keys`` / ``token_column``, across shard and chunk edges."""
    ks = kscale.store.open(make_store(tmp_path / "s", n_shards=4, writer=writer, version=version, chunk=3))
    rng = np.random.default_rng(0)
    for m in ("text", "image"):
        keys, ids = ks.keys(5, m, [2, 0]).compute(), ks.token_column(m, "sample_id").compute()
        rope = ks.token_column(m, "rope_pos").compute()
        N = len(ids)
        for lo, hi in ((0, N), (2, N - 5), (4, 4), (N - 1, N)):
            assert ks.keys_rows(5, m, lo, hi, [2, 0]).compute().tobytes() == keys[lo:hi].tobytes()
            np.testing.assert_array_equal(ks.column_rows(m, "sample_id", lo, hi).compute(), ids[lo:hi])
            np.testing.assert_array_equal(ks.column_rows(m, "rope_pos", lo, hi).compute(), rope[lo:hi])
        assert len(ks.spans(m, 0, N)) == 4 and len(ks.spans(m, 2, 3)) == 1
        for index in (rng.integers(0, N, 3 * N), rng.permutation(N)[:7], np.zeros(0, int)):
            for per_task in (1, 10**6):
                got = ks._gather(m, ks._keys_sel(5, [2, 0]), index, rows_per_task=per_task)
                assert got.dtype == np.float16 and got.tobytes() == keys[index].tobytes()
            np.testing.assert_array_equal(ks.column_at(m, "sample_id", index), ids[index])
    with pytest.raises(IndexError):
        ks.keys_rows(5, "text", 0, N + 1)


def test_v1_store_is_not_resumed_by_the_v2_writer(tmp_path):
    path = make_store(tmp_path / "v1", n_shards=1, writer=ShardWriterV1, version=1)
    with pytest.raises(ValueError, match="format version 1"):
        write_shard(path, 1)


def test_token_columns_are_lazy_and_chunked_like_keys(tmp_path):
    ks = kscale.store.open(make_store(tmp_path / "s"))
    keys = ks.keys(3, "image")
    for c in ("sample_id", "rope_pos", "image_index"):
        col = ks.token_column("image", c)
        assert col.chunks[0] == keys.chunks[0] and col.dtype == kscale.store.layout.TABLE_COLUMNS[c]
    assert ks.token_column("image", "rope_pos").shape == (9 + 11 + 13, R)
    assert len(keys.chunks[0]) == 3 + 3 + 4  # ceil(n / 4) blocks per shard: one task each


def test_files_per_shard_do_not_grow_with_layers(tmp_path):
    def n_files(n_layers: int) -> int:
        w = ShardWriter(tmp_path / f"L{n_layers}", "s000000", n_layers=n_layers, n_heads=H, head_dim=D, rope_rows=R,
                        key_dtype="float16", chunk_tokens=4)
        k = np.zeros((n_layers, 10, H, D), "float16")
        _, cols = shard_data(0, "image", 10)
        w.append("image", k, cols)
        return len(w.commit({}, [])["files"])
    assert n_files(2) == n_files(28) == 2 + 4 + 4  # shard and image groups; keys, tokens: zarr.json + 3 files


def test_store_is_a_plain_zarr_hierarchy(tmp_path):
    path = make_store(tmp_path / "s", n_shards=1)
    g = zarr.open_group(path, mode="r")
    members = dict(g.members(max_depth=None))
    assert "shards/s000000/image/keys" in members and "shards/s000000/attention/mass" in members
    k = members["shards/s000000/image/keys"]
    assert k.shards == (L, 4, H, D) and k.chunks == (1, 4, H, D)
    assert np.array_equal(k[1], kscale.store.open(path).keys(5, "image").compute())


# ---------------------------------------------------------------------------------------------- index


def marker_based(path) -> KeyStore:
    return KeyStore(str(path), dict(zarr.open_group(str(path), mode="r").attrs), build_index(path))


def test_index_present_missing_stale_half_written(tmp_path):
    path = make_store(tmp_path / "s")
    write_index(path)
    ks = kscale.store.open(path)
    assert ks.index.source == "index"
    assert_same(read_all(ks), read_all(marker_based(path)))

    os.remove(os.path.join(path, INDEX_FILE))  # missing
    assert kscale.store.open(path).index.source == "markers"
    assert_same(read_all(kscale.store.open(path)), read_all(marker_based(path)))

    write_index(path)
    write_shard(path, 3)  # stale: a shard committed after the index
    ks = kscale.store.open(path)
    assert list(ks.shards) == ["s000000", "s000001", "s000002", "s000003"]
    assert_same(read_all(ks), read_all(marker_based(path)))

    # half-written: killed mid-write leaves a temp beside a good index, or a torn index file itself
    (tmp_path / "s" / f".{INDEX_FILE}.tmp-99-1").write_text('{"format": "kscale-index", "shards": [{"na')
    assert_same(read_all(kscale.store.open(path)), read_all(marker_based(path)))
    (tmp_path / "s" / INDEX_FILE).write_text('{"format": "kscale-index", "version": 1, "shards": [{"name": "s0')
    assert load_index(path).source == "markers"
    assert_same(read_all(kscale.store.open(path)), read_all(marker_based(path)))


def test_uncommitted_shards_are_never_visible(tmp_path):
    path = make_store(tmp_path / "s")
    write_index(path)
    w = ShardWriter(path, "s000007", n_layers=L, n_heads=H, head_dim=D, rope_rows=R, key_dtype="float16",
                    chunk_tokens=4)  # a writer at work: staging folder only
    k, cols = shard_data(7, "image", 9)
    w.append("image", k, cols)
    w.pool.shutdown(wait=True)
    os.remove(marker_path(path, "s000002"))  # un-committed after the index was written
    ks = kscale.store.open(path)
    assert list(ks.shards) == ["s000000", "s000001"]
    assert ks.keys(3, "image").shape[0] == 9 + 11 and ks.summary()["shards_committed"] == 2


def test_committed_shard_is_never_rewritten(tmp_path):
    path = make_store(tmp_path / "s", n_shards=1)
    before = sorted(p.stat().st_mtime_ns for p in shard_dir(path, "s000000").rglob("*"))
    with pytest.raises(ShardCommitted):
        write_shard(path, 0)
    w = ShardWriter(path, "s000001", n_layers=L, n_heads=H, head_dim=D, rope_rows=R, key_dtype="float16",
                    chunk_tokens=4)
    shutil.copy(marker_path(path, "s000000"), marker_path(path, "s000001"))  # committed by someone meanwhile
    with pytest.raises(ShardCommitted):
        w.commit({}, [])
    assert sorted(p.stat().st_mtime_ns for p in shard_dir(path, "s000000").rglob("*")) == before


# ---------------------------------------------------------------------------------------------- damage


def _flip(p) -> None:
    b = bytearray(p.read_bytes())
    b[40] ^= 0xFF  # inside layer 0's inner chunk (the shard index sits at the end)
    p.write_bytes(bytes(b))


DAMAGE = {  # kind -> (how, the damaged arrays, what a read of a damaged array raises)
    "deleted keys chunk": (lambda s: (s / "image/keys/c.0.1.0.0").unlink(), {"keys"},
                           "keys chunk c.0.1.0.0 is damaged: file missing"),
    "truncated keys chunk": (lambda s: os.truncate(s / "image/keys/c.0.1.0.0", 100), {"keys"},
                             "keys chunk c.0.1.0.0 is damaged: ValueError"),
    "flipped keys byte": (lambda s: _flip(s / "image/keys/c.0.0.0.0"), {"keys"},
                          "keys chunk c.0.0.0.0 is damaged: ValueError"),
    "deleted token chunk": (lambda s: (s / "image/tokens/c.2.0").unlink(), {"tokens"},
                            "tokens chunk c.2.0 is damaged: file missing"),
    "deleted modality folder": (lambda s: shutil.rmtree(s / "image"), {"keys", "tokens"},
                                "(keys|tokens) chunk c.* is damaged: file missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_named_found_repaired_and_redone(tmp_path, kind):
    path = make_store(tmp_path / "s")
    write_index(path)
    good = read_all(kscale.store.open(path))
    damage, damaged, message = DAMAGE[kind]
    damage(shard_dir(path, "s000001"))
    ks = kscale.store.open(path)
    N = ks.n_tokens()["image"]  # from the index: no file read
    reads = {"keys": [lambda: ks.keys(3, "image").compute(),
                      lambda: ks.keys_rows(3, "image", 0, N).compute()],  # coarse reads name it too
             "tokens": [lambda: ks.tokens("image"), lambda: ks.column_at("image", "sample_id", np.arange(N))]}
    for array, fns in reads.items():
        for fn in fns:  # one read per block: each must raise on its own
            if array in damaged:
                with pytest.raises(StoreDamaged, match=f"shard s000001/image/{message}"):
                    fn()
            else:
                fn()  # the undamaged array still reads
    found = verify_store(path)
    assert {d.shard for d in found} == {"s000001"}
    quick = verify_store(path, quick=True)  # files and sizes only: finds all but a same-size flip
    assert {d.shard for d in quick} == (set() if kind == "flipped keys byte" else {"s000001"})
    res = CliRunner().invoke(main, ["verify", path, "--repair"])
    assert res.exit_code == 1 and "s000001" in res.output and "un-committed 1" in res.output
    assert list(kscale.store.open(path).shards) == ["s000000", "s000002"]
    write_shard(path, 1)  # the rerun redoes exactly the un-committed shard
    assert verify_store(path) == []
    assert_same(read_all(kscale.store.open(path)), good)


def test_garbage_marker_invalidates_only_its_shard(tmp_path):
    """Without an index (or after ``--reindex``) a garbage marker is named; an index written before the damage
    still describes the shard's intact data (the marker is not read), and ``verify`` finds it either way."""
    path = make_store(tmp_path / "s")
    write_index(path)
    marker_path(path, "s000002").write_text("{not json")
    assert [d.shard for d in verify_store(path)] == ["s000002"]
    assert kscale.store.open(path).keys(3, "image").shape[0] == 9 + 11 + 13
    os.remove(os.path.join(path, INDEX_FILE))
    ks = kscale.store.open(path)  # the store opens; the shard is named everywhere
    assert set(ks.summary()["shards_invalid"]) == {"s000002"} and ks.summary()["shards_committed"] == 2
    with pytest.raises(StoreDamaged, match="s000002.*marker unreadable"):
        ks.keys(3, "image")
    assert [d.shard for d in verify_store(path)] == ["s000002"]
    res = CliRunner().invoke(main, ["info", path])
    assert res.exit_code == 0 and "s000002" in res.output


def test_verify_clean_store_and_info_reindex(tmp_path):
    path = make_store(tmp_path / "s")
    res = CliRunner().invoke(main, ["verify", path])
    assert res.exit_code == 0 and "ok" in res.output
    res = CliRunner().invoke(main, ["info", "--reindex", "--json", path])
    assert res.exit_code == 0 and json.loads(res.output)["shards_committed"] == 3
    assert json.loads((tmp_path / "s" / INDEX_FILE).read_text())["shards"][2]["offset"]["image"] == 9 + 11


def test_killed_writer_staging_is_cleared_and_never_read(tmp_path):
    path = make_store(tmp_path / "s", n_shards=1)
    junk = tmp_path / "s" / "shards" / ".s000001.tmp-99999"  # a writer killed mid-shard (another pid)
    (junk / "image" / "keys").mkdir(parents=True)
    (junk / "image" / "keys" / "c.0.0.0.0").write_bytes(b"partial")
    assert list(kscale.store.open(path).shards) == ["s000000"]
    write_shard(path, 1)
    assert not junk.exists() and list(kscale.store.open(path).shards) == ["s000000", "s000001"]


def test_a_short_shard_is_not_padded_to_chunk_tokens(tmp_path):
    w = ShardWriter(tmp_path / "s", "s000000", n_layers=28, n_heads=H, head_dim=D, rope_rows=R, key_dtype="float16",
                    chunk_tokens=4096)
    _, cols = shard_data(0, "image", 10)
    w.append("image", np.zeros((28, 10, H, D), "float16"), cols)
    files = w.commit({}, [])["files"]
    assert files["image/keys/c.0.0.0.0"] < 28 * 10 * H * D * 2 + 1024  # not 28 * 4096 rows
