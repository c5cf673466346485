"""The direct read path (``kscale.store.decode``) returns what zarr-python returns, byte for byte, refuses
damage like zarr does, and hands everything it does not decode to zarr.

Stores are written by kscale's own writers (``ShardWriter`` for keys, tokens and side tables,
``QueryWriter`` for queries) in the shapes they write: a modality shorter than one chunk, chunks plus a
padded last chunk, zstd keys, float32 keys, a layer count that is not a power of two, a shard without a
modality. Every read is compared with ``zarr.open_array(...)[sel]`` (an implementation kscale did not write)
and, through the store's reader, with the same read with ``reader.DIRECT_READS`` off.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

import kscale.store
import kscale.store.reader as reader
from kscale.store import decode
from kscale.store.layout import FLAT_CHUNKS, STORE_FORMAT
from kscale.store.reader import StoreDamaged, read_block
from kscale.store.writer import ShardWriter

H, D = 2, 4


def write_shard(store, name: str, L: int, dtype: str, chunk: int, compress: bool, sizes: dict[str, list[int]],
                seed: int = 0) -> None:
    """One shard through the real writer: per modality, appends of ``sizes[modality]`` rows, and a side table."""
    rng = np.random.default_rng(seed)
    w = ShardWriter(store, name, n_layers=L, n_heads=H, head_dim=D, rope_rows=3, key_dtype=dtype,
                    chunk_tokens=chunk, compress_keys=compress)
    for modality, parts in sizes.items():
        for i, n in enumerate(parts):
            cols = {"sample_id": np.full(n, i + 7 * seed), "position": np.arange(n),
                    "token_id": rng.integers(-5, 99, n), "image_index": np.full(n, -1),
                    "rope_pos": rng.integers(0, 1 << 40, (n, 3))}
            w.append(modality, rng.standard_normal((L, n, H, D)).astype(dtype), cols)
    w.append_table("attention", {"sample_id": np.arange(3) + seed, "mass": rng.random(3),
                                 "heads": rng.random((3, 2)).astype("float32")})
    w.commit({"shard": name, "n_samples_ok": 3}, [])


def selections(shape: tuple[int, ...]) -> list[tuple]:
    """Selections of the kinds the reader makes (one layer, a row range, heads, a token column), and more."""
    n = shape[1] if len(shape) == 4 else shape[0]
    rows = [slice(None), slice(0, min(3, n)), slice(n // 2, n), slice(1, n - 1), slice(n, n), slice(0, n, 3)]
    if len(shape) == 4:
        L = shape[0]
        return [(Ellipsis,), (0,), (L - 1,), (-1,)] + [(li, r) for li in range(L) for r in rows] + [
            (L - 1, slice(1, n), [1, 0]), (0, slice(0, n), [1]), (slice(0, L), slice(0, n), 0, [3, 0, 0]),
            (slice(1, L), [n - 1, 0])]
    return [(Ellipsis,)] + [(r, f) for r in rows for f in (0, 2, slice(4, 7), slice(None), -1)] + [
        (slice(0, n), [6, 0])]


def assert_same(got: np.ndarray, want: np.ndarray, what) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    assert got.tobytes() == want.tobytes(), what


CASES = {  # L, dtype, chunk_tokens, zstd keys, {modality: appends}
    "short": (4, "float16", 64, False, {"image": [5, 7], "text": [1]}),  # one chunk of exactly N rows
    "chunks+tail": (3, "float16", 4, False, {"image": [3, 6, 2, 4], "text": [4, 4]}),  # padded last chunk
    "zstd": (5, "float16", 4, True, {"image": [9, 2], "text": [3]}),
    "float32": (2, "float32", 4, False, {"image": [10]}),  # a shard without text
}


@pytest.mark.parametrize("case", list(CASES))
def test_reads_equal_zarrs_byte_for_byte(tmp_path, case):
    L, dtype, chunk, compress, sizes = CASES[case]
    write_shard(tmp_path, "s000000", L, dtype, chunk, compress, sizes)
    shard = tmp_path / "shards" / "s000000"
    arrays = [f"{m}/{a}" for m in sizes for a in ("keys", "tokens")] + ["attention/sample_id", "attention/mass",
                                                                        "attention/heads"]
    n_reads = 0
    for name in arrays:
        path = str(shard / name)
        ref = zarr.open_array(path, mode="r")
        meta = decode.read_meta(path)
        assert meta.shape == ref.shape and meta.dtype == ref.dtype
        sels = selections(ref.shape) if ref.ndim in (2, 4) and not name.startswith("attention") else [
            (Ellipsis,), (slice(1, 3),), (slice(0, 0),), (-1,)]
        for sel in sels:
            assert_same(decode.read(path, meta, sel), np.asarray(ref[sel]), (name, sel))
            n_reads += 1
    assert n_reads > 50


def open_store(path, shards: dict[str, dict]) -> kscale.store.reader.KeyStore:
    g = zarr.open_group(str(path), mode="w")
    g.attrs.update({"format": STORE_FORMAT, "version": 2, "layers": [0, 1, 2], "heads": [0, 1], "head_dim": D,
                    "key_dtype": "float16", "rope_rows": 3})
    for i, (name, sizes) in enumerate(shards.items()):
        write_shard(path, name, 3, "float16", 4, i % 2 == 1, sizes, seed=i)
    return kscale.store.open(path)


def counted(calls: list):
    """``reader._open_array`` (zarr's path) that records its calls."""
    real = reader._open_array
    return lambda *a: calls.append(a) or real(*a)


def read_everything(ks) -> list[np.ndarray]:
    """Every read the analysis makes (coarse rows, gathers, per-chunk graphs, the token table, side tables)."""
    out = []
    for m in ("text", "image"):
        N = ks.n_tokens()[m]
        for layer in (0, 2):
            out += [ks.keys(layer, m).compute(), ks.keys(layer, m, heads=[1]).compute(),
                    ks.keys_rows(layer, m, 0, N, heads=[0]).compute(), ks.keys_rows(layer, m, 2, N - 3).compute(),
                    ks.keys_at(layer, m, np.array([N - 1, 0, 5, 5, 2]), heads=[1, 0])]
        out += [ks.column_rows(m, "sample_id", 1, N).compute(), ks.column_rows(m, "rope_pos", 0, N).compute(),
                ks.column_at(m, "token_id", np.array([3, N - 1, 0])), *ks.tokens(m).values()]
    return out + list(ks.table("attention").values())


def test_store_reads_equal_with_the_switch_off(tmp_path, monkeypatch):
    """Through the store's reader, over shards with and without a modality (an empty one between them):
    the same arrays whether chunks are decoded here or by zarr; and the direct path really ran (no zarr)."""
    ks = open_store(tmp_path, {"s000000": {"image": [6, 3], "text": [2]}, "s000001": {"text": [5]},
                               "s000002": {"image": [4, 4, 1], "text": [9]}})
    calls = []
    monkeypatch.setattr(reader, "_open_array", counted(calls))
    direct = read_everything(ks)
    assert calls == []  # every keys/tokens read was decoded here
    monkeypatch.setattr(reader, "DIRECT_READS", False)
    via_zarr = read_everything(ks)
    assert calls  # and the switch sends them through zarr
    assert len(direct) == len(via_zarr) > 40
    for i, (a, b) in enumerate(zip(direct, via_zarr)):
        assert_same(np.asarray(a), np.asarray(b), i)


def test_queries_equal_zarrs(tmp_path):
    """Format-2 queries were written by zarr itself (``QueryWriter``: sharded, crc32c only): decoded the same."""
    import torch  # a dependency of kscale (queries.py needs it)

    from tests.store_queries_v2 import QueryWriter  # the format-2 query writer (zarr-python itself)

    w = ShardWriter(tmp_path, "s000000", n_layers=3, n_heads=H, head_dim=D, rope_rows=3, key_dtype="float16",
                    chunk_tokens=4)
    q = QueryWriter(tmp_path, "s000000", dtype="float16", chunk_tokens=4)
    q.append("image", torch.randn(3, 11, 4, D).numpy())
    q.close()
    path = str(w.dir / "queries/image/queries")
    ref = zarr.open_array(path, mode="r")
    meta = decode.read_meta(path)
    assert meta.inner == (1, 4, 4, D) and not meta.zstd
    for sel in selections(ref.shape):
        assert_same(decode.read(path, meta, sel), np.asarray(ref[sel]), sel)


# ------------------------------------------------------------------------------------------------ damage

def _shard_file(tmp_path, compress: bool = False):
    write_shard(tmp_path, "s000000", 3, "float16", 4, compress, {"image": [8]})
    return tmp_path / "shards" / "s000000" / "image" / "keys" / "c.0.0.0.0"


def _flip(p, at: int) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 0x01
    p.write_bytes(bytes(b))


def _read(tmp_path, layer: int = 0):
    return read_block(str(tmp_path), "s000000", "image/keys", "c.0.0.0.0", (3, 8, H, D), (layer, slice(0, 8)),
                      "float16")


@pytest.mark.parametrize("where", ["inner chunk data", "inner chunk crc", "index crc", "index entry"])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
def test_damage_is_detected_not_decoded_around(tmp_path, monkeypatch, where, compress):
    """A flipped bit anywhere in a shard file raises zarr's checksum ``ValueError`` (``StoreDamaged`` through
    the reader) and never falls back to zarr; reads of undamaged layers of another file still work."""
    f = _shard_file(tmp_path, compress)
    size = f.stat().st_size
    at = {"inner chunk data": 10, "inner chunk crc": int(np.frombuffer(f.read_bytes()[-52:-4], "<u8")[1]) - 2,
          "index crc": size - 1, "index entry": size - 52 + 16 + 8}[where]  # layer 1's nbytes
    _flip(f, at)
    layer = 1 if where == "index entry" else 0
    meta = decode.read_meta(str(f.parent))
    with pytest.raises(ValueError, match="Stored and computed checksum do not match"):
        decode.read(str(f.parent), meta, (layer, slice(0, 8)))
    monkeypatch.setattr(reader, "_open_array", lambda *a: pytest.fail("fell back to zarr on damage"))
    with pytest.raises(StoreDamaged, match="s000000/image/keys chunk c.0.0.0.0 is damaged: ValueError: Stored and "
                                           "computed checksum"):
        _read(tmp_path, layer)


def test_zarr_names_the_same_damage(tmp_path, monkeypatch):
    """The zarr path (switch off) refuses the same flipped byte with the same kind of error, so both paths
    feed ``kscale verify`` and the reader's damage handling alike."""
    f = _shard_file(tmp_path)
    _flip(f, 10)
    monkeypatch.setattr(reader, "DIRECT_READS", False)
    with pytest.raises(StoreDamaged, match="c.0.0.0.0 is damaged: ValueError: Stored and computed checksum"):
        _read(tmp_path)


def test_truncated_and_missing_files(tmp_path):
    f = _shard_file(tmp_path)
    good = _read(tmp_path, 2)
    data = f.read_bytes()
    f.write_bytes(data[:-60])  # the index is gone: its crc fails
    with pytest.raises(StoreDamaged, match="c.0.0.0.0 is damaged: ValueError"):
        _read(tmp_path)
    f.write_bytes(data[:30] + data[-52:])  # the index intact, the chunks it points at cut away
    with pytest.raises(StoreDamaged, match="c.0.0.0.0 is damaged: ValueError: inner chunk .* outside the file"):
        _read(tmp_path, 2)
    f.write_bytes(data[:2])
    with pytest.raises(StoreDamaged, match="c.0.0.0.0 is damaged: ValueError: shard file of 2 bytes"):
        _read(tmp_path)
    f.unlink()
    with pytest.raises(StoreDamaged, match="c.0.0.0.0 is damaged: file missing"):
        _read(tmp_path)
    (f.parent / "zarr.json").unlink()
    f.write_bytes(data)
    with pytest.raises(StoreDamaged, match="chunk zarr.json is damaged: file missing"):
        _read(tmp_path)
    (f.parent / "zarr.json").write_text("{}")
    with pytest.raises(StoreDamaged, match="c.0.0.0.0 is damaged"):  # not decodable metadata: zarr names it
        _read(tmp_path)
    assert good.shape == (8, H, D)


# ------------------------------------------------------------------------------------------------ fallback

def _rewrite_with_zarr(path, **kwargs) -> np.ndarray:
    """Rewrite the array at ``path`` with zarr itself (same data and shape, other codecs or chunks)."""
    data = zarr.open_array(str(path), mode="r")[...]
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, overwrite=True, **FLAT_CHUNKS, **kwargs)
    arr[...] = data
    return data


FOREIGN = {  # what zarr writes and this decoder leaves to zarr
    "gzip": dict(chunks=(1, 4, H, D), shards=(3, 4, H, D), compressors=[GzipCodec(), Crc32cCodec()]),
    "blosc": dict(chunks=(3, 4, H, D), compressors=[BloscCodec()]),
    "no crc32c": dict(chunks=(1, 4, H, D), shards=(3, 4, H, D), compressors=[ZstdCodec(level=1)]),
    "big endian": dict(chunks=(1, 4, H, D), shards=(3, 4, H, D), serializer=BytesCodec(endian="big"),
                       compressors=[Crc32cCodec()]),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_other_codecs_fall_back_to_zarr(tmp_path, monkeypatch, kind):
    f = _shard_file(tmp_path)
    data = _rewrite_with_zarr(f.parent, **FOREIGN[kind])
    with pytest.raises(decode.Unsupported):
        decode.read_meta(str(f.parent))
    calls = []
    monkeypatch.setattr(reader, "_open_array", counted(calls))
    for layer in range(3):
        assert_same(_read(tmp_path, layer), data[layer, 0:8], (kind, layer))
    assert len(calls) == 3  # each read went through zarr


def test_unwritten_inner_chunk_reads_as_zarrs_fill_value(tmp_path, monkeypatch):
    """A shard index entry marking an inner chunk as never written (zarr skips all-fill chunks by default) is
    zarr's to answer (its fill value), not a guess of this decoder's."""
    f = _shard_file(tmp_path)
    path = f.parent
    data = zarr.open_array(str(path), mode="r")[...]
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 4, H, D), shards=(3, 4, H, D),
                            compressors=[Crc32cCodec()], fill_value=0, overwrite=True,
                            chunk_key_encoding={"name": "default", "separator": "."})
    data[1] = 0  # layer 1 all fill: zarr does not write it
    arr[...] = data
    decode.read_meta(str(path))  # the metadata is one the decoder reads ...
    with pytest.raises(decode.Unsupported, match="not written"):  # ... but not this chunk
        decode.read(str(path), decode.read_meta(str(path)), (1, slice(0, 8)))
    assert_same(decode.read(str(path), decode.read_meta(str(path)), (0, slice(0, 8))), data[0], "layer 0")
    for layer in range(3):
        assert_same(_read(tmp_path, layer), data[layer], layer)
