"""Issue 21 items 9, 10 and 12: every array kscale reads refuses a missing chunk, ``verify`` checks every
file its marker lists (metadata by crc32c), and a committed shard is durable (fsynced before its marker).

Stores are written through the real ``ShardWriter`` (with stored queries and an attention table) and read
back through ``kscale.store.open``; the damage is done on disk, as a crash or a bad disk would.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import kscale.store
from kscale.cli import main
from kscale.store.layout import STORE_FORMAT, marker_path, read_marker, shard_dir
from tests.store_queries_v2 import QueryWriter
from kscale.store.reader import StoreDamaged
from kscale.store.verify import verify_store
from kscale.store.writer import ShardWriter
from tests.store_v1 import ShardWriterV1
from tests.unit.test_store_v2 import H, L, LAYERS, R, make_store, shard_data

HQ = 2 * H  # query heads: 2 per KV head


def write_shard(path, s: int) -> None:
    """One shard: text and image keys, their queries, and an attention table whose ``mass`` is 0.0 in shard 0
    (an all-zero chunk, which zarr would not write by default)."""
    name = f"s{s:06d}"
    w = ShardWriter(path, name, n_layers=L, n_heads=H, head_dim=4, rope_rows=R, key_dtype="float16", chunk_tokens=4)
    q = QueryWriter(path, name, dtype="float16", chunk_tokens=4)
    for modality, n in (("text", 5 + s), ("image", 9 + 2 * s)):
        k, cols = shard_data(s, modality, n)
        w.append(modality, k, cols)
        q.append(modality, np.random.default_rng(s).standard_normal((L, n, HQ, 4)).astype("float16"))
    q.close()
    w.append_table("attention", {"sample_id": np.arange(3 * s, 3 * s + 3), "mass": np.full(3, 0.25 * s)})
    w.commit({"shard": name, "start": 3 * s, "stop": 3 * s + 3, "n_samples": 3, "n_samples_ok": 3, "n_errors": 0}, [])


def store_with_queries(path: Path, n_shards: int = 3) -> str:
    g = zarr.open_group(str(path), mode="w")
    g.attrs.update({"format": STORE_FORMAT, "version": 2, "layers": LAYERS, "heads": [0, 1, 2], "head_dim": 4,
                    "key_dtype": "float16", "rope_rows": R, "plan": {"n_shards": n_shards},
                    "model": {"num_heads": HQ, "num_kv_heads": H}})
    for s in range(n_shards):
        write_shard(path, s)
    return str(path)


def read_everything(ks) -> None:
    """Every read path: keys, token table, queries, the attention table."""
    for m in ("text", "image"):
        ks.keys(3, m).compute()
        ks.tokens(m)
        ks.queries(5, m).compute()
    ks.table("attention")


# ----------------------------------------------------------------------- item 9: no chunk reads as zeros

MISSING = {  # file deleted in a shard -> (read, what the error names)
    "attention column chunk": ("attention/mass/c/0", lambda ks: ks.table("attention"), "attention/mass chunk c/0"),
    "attention sample_id chunk": ("attention/sample_id/c/0", lambda ks: ks.table("attention"),
                                  "attention/sample_id chunk c/0"),
    "attention column metadata": ("attention/mass/zarr.json", lambda ks: ks.table("attention"),
                                  "attention/mass chunk zarr.json"),
    "query chunk": ("queries/image/queries/c.0.1.0.0", lambda ks: ks.queries(5, "image").compute(),
                    "queries/image/queries chunk c.0.1.0.0"),
    "keys chunk": ("image/keys/c.0.1.0.0", lambda ks: ks.keys(3, "image").compute(), "image/keys chunk c.0.1.0.0"),
    "token chunk": ("text/tokens/c.1.0", lambda ks: ks.tokens("text"), "text/tokens chunk c.1.0"),
}


@pytest.mark.parametrize("shard", ["s000000", "s000001"])
@pytest.mark.parametrize("kind", list(MISSING))
def test_a_deleted_chunk_of_any_array_is_named_never_zeros(tmp_path, kind, shard):
    path = store_with_queries(tmp_path / "s")
    ks = kscale.store.open(path)
    read_everything(ks)  # sound before
    rel, read, names = MISSING[kind]
    (shard_dir(path, shard) / rel).unlink()
    with pytest.raises(StoreDamaged, match=f"shard {shard}/{names} is damaged: file missing"):
        read(kscale.store.open(path))
    assert {d.shard for d in verify_store(path)} == {shard}
    assert {d.shard for d in verify_store(path, quick=True)} == {shard}


def test_the_issue_reproduction_attention_chunks_of_one_shard(tmp_path):
    """Deleting ``attention/*/c/0`` of one shard gave a table of zeros; now it is an error naming the shard."""
    path = store_with_queries(tmp_path / "s")
    for col in ("mass", "sample_id"):
        (shard_dir(path, "s000002") / "attention" / col / "c" / "0").unlink()
    with pytest.raises(StoreDamaged, match="shard s000002/attention/(mass|sample_id) chunk c/0"):
        kscale.store.open(path).table("attention")


def test_a_column_missing_from_one_shard_is_named(tmp_path):
    """A whole column folder gone (its metadata with it): the marker still lists it."""
    path = store_with_queries(tmp_path / "s")
    shutil.rmtree(shard_dir(path, "s000001") / "attention" / "mass")
    with pytest.raises(StoreDamaged, match="shard s000001/attention/mass chunk zarr.json is damaged: file missing"):
        kscale.store.open(path).table("attention")


def test_every_table_chunk_is_written_even_all_zero(tmp_path):
    path = store_with_queries(tmp_path / "s")
    assert (shard_dir(path, "s000000") / "attention" / "mass" / "c" / "0").is_file()  # mass == 0.0 there
    table = kscale.store.open(path).table("attention")
    np.testing.assert_array_equal(table["mass"], np.repeat([0.0, 0.25, 0.5], 3))


def test_layout_1_arrays_refuse_a_missing_chunk(tmp_path):
    path = make_store(tmp_path / "v1", writer=ShardWriterV1, version=1)
    (shard_dir(path, "s000001") / "image" / "keys" / "c.0.1.0.0").unlink()
    ks = kscale.store.open(path)
    with pytest.raises(StoreDamaged, match="shard s000001/image/keys chunk c.0.1.0.0 is damaged: file missing"):
        ks.keys(3, "image").compute()
    (shard_dir(path, "s000002") / "text" / "position" / "c.0").unlink()
    with pytest.raises(StoreDamaged, match="shard s000002/text/position chunk c.0 is damaged: file missing"):
        ks.tokens("text")
    with pytest.raises(StoreDamaged, match="shard s000002/text/position chunk c.0"):
        ks.token_column("text", "position").compute()


# ------------------------------------------------------------- item 10: verify checks every listed file

METADATA = ["zarr.json", "text/zarr.json", "text/keys/zarr.json", "image/tokens/zarr.json", "attention/zarr.json",
            "attention/mass/zarr.json", "queries/zarr.json", "queries/image/queries/zarr.json"]


def _flip_byte(p: Path, how: str) -> None:
    """Change one byte, size unchanged: inside ``node_type``'s value (the file no longer opens as what it
    was), or one space of the indentation made a tab (still valid JSON of the same meaning: only the
    checksum can tell)."""
    b = bytearray(p.read_bytes())
    i = b.index(b'"node_type": "') + len(b'"node_type": "') + 1 if how == "value" else b.index(b"\n  ") + 1
    b[i] ^= 0x01 if how == "value" else (ord(" ") ^ ord("\t"))
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["value", "whitespace"])
@pytest.mark.parametrize("meta", METADATA)
def test_a_flipped_metadata_byte_is_found_and_repaired(tmp_path, meta, how):
    path = store_with_queries(tmp_path / "s")
    assert set(read_marker(path, "s000001")["meta_crc32c"]) == {
        f for f in read_marker(path, "s000001")["files"] if f.endswith("zarr.json")}
    target = shard_dir(path, "s000001") / meta
    size = target.stat().st_size
    _flip_byte(target, how)
    assert target.stat().st_size == size
    for quick in (False, True):
        found = verify_store(path, quick=quick)
        assert [(d.shard, d.array, d.chunk) for d in found] == [("s000001", meta.rpartition("/")[0], "zarr.json")]
        assert "metadata damaged" in found[0].reason
    res = CliRunner().invoke(main, ["verify", path, "--repair"])
    assert res.exit_code == 1 and f"damaged s000001/{meta}" in res.output.replace(" chunk ", "/"), res.output
    assert "un-committed 1" in res.output and not marker_path(path, "s000001").exists()
    write_shard(path, 1)  # the rerun redoes the un-committed shard
    assert CliRunner().invoke(main, ["verify", path]).output.strip().endswith(": ok")


def test_metadata_that_does_not_open_is_damage_without_checksums(tmp_path):
    """An older marker without ``meta_crc32c``: an array's metadata that does not open is still damage (it was
    skipped as "probably a group"), and verify says which shards carry no metadata checksums."""
    path = store_with_queries(tmp_path / "s")
    for s in ("s000000", "s000001", "s000002"):
        m = read_marker(path, s)
        del m["meta_crc32c"]
        marker_path(path, s).write_text(__import__("json").dumps(m))
    _flip_byte(shard_dir(path, "s000001") / "text/keys/zarr.json", "value")
    found = verify_store(path, quick=True, unchecked=(unchecked := []))
    assert [(d.shard, d.array) for d in found] == [("s000001", "text/keys")]
    assert unchecked == ["s000000", "s000001", "s000002"]
    res = CliRunner().invoke(main, ["verify", path])
    assert "3 shard(s) (s000000, s000001, s000002) were written before markers recorded metadata checksums" in res.output
    assert "damaged s000001/text/keys chunk zarr.json" in res.output and res.exit_code == 1


# ---------------------------------------------------------------- item 12: durable before committed


def test_every_file_and_folder_is_fsynced_before_the_marker(tmp_path, monkeypatch):
    path = tmp_path / "s"
    store_with_queries(path, n_shards=0)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b, *args, **kw):
        events.append(("rename", f"{os.fspath(a)} -> {os.fspath(b)}"))
        return real_rename(a, b, *args, **kw)

    def link(a, b, *args, **kw):
        events.append(("link", os.fspath(b)))
        return real_link(a, b, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    write_shard(path, 0)
    monkeypatch.undo()

    final = shard_dir(path, "s000000")
    staging = next(e[1].split(" -> ")[0] for e in events if e[0] == "rename" and e[1].endswith(f" -> {final}"))
    marker_at = events.index(("link", str(marker_path(path, "s000000"))))
    renamed_at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1].endswith(f" -> {final}"))
    synced = {p for kind, p in events[:renamed_at] if kind == "fsync"}
    files = read_marker(path, "s000000")["files"]
    assert len(files) > 10
    missing = [f for f in files if os.path.join(staging, f) not in synced]
    assert not missing, f"not fsynced before the rename: {missing}"
    folders = {staging} | {os.path.join(staging, f).rsplit("/", 1)[0] for f in files}
    assert folders <= synced, sorted(folders - synced)
    assert ("fsync", str(final.parent)) in events[renamed_at:marker_at]  # the rename itself is durable
    assert marker_at > renamed_at
