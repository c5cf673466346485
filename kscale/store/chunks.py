"""Zarr v3 files of a shard, written here: the exact bytes zarr writes, without zarr's machinery.

``ShardWriter`` writes its groups' and arrays' ``zarr.json`` and the chunk files of whole
``chunk_tokens`` blocks with these functions. Zarr's generic path (async tasks per inner chunk,
fill-value buffers, merges, an atomic rename per metadata file) cost ~15 ms of CPU per 5 MB shard file
and ~2 ms per ``zarr.json`` on this machine, 7x the crc32c and the copies; the extraction's writer runs
on the cores of the forward, so that overhead was most of the key path's cost. Only what kscale writes
is encoded:

- ``keys``: the sharding codec, inner chunks (1, c, H, D) in the order zarr stores them (layer 0 first;
  Morton order over a grid (L, 1, 1, 1) is layer order), each ``bytes`` (little-endian, C order) [+ zstd
  level 0] + crc32c; then the index (L, 2) uint64 (offset, nbytes) + crc32c, at the end of the file.
- ``tokens``: one chunk (c, F) int64, ``bytes`` + zstd level 0 + crc32c.
- ``zarr.json`` of groups and arrays: the dict zarr's metadata classes give, ``json.dumps(indent=2)``.

A block shorter than ``c`` rows (the array's last) is padded with the fill value 0, as zarr pads edge
chunks. ``tests/unit/test_store_chunks.py`` checks every file against zarr's own, byte for byte; plain
zarr (and kscale's reader) reads the result.

Legend: L layers, c rows per chunk, H kv heads, D head dim, F token fields.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import google_crc32c
import numpy as np

_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_ZSTD = {"name": "zstd", "configuration": {"level": 0, "checksum": False}}
_CRC = {"name": "crc32c"}


def _crc(buf) -> bytes:
    return int(google_crc32c.value(buf)).to_bytes(4, "little")


def _rows(block: np.ndarray, c: int, axis: int) -> np.ndarray:
    """``block`` little-endian and C-contiguous, padded with zeros to ``c`` rows along ``axis``."""
    block = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    n = block.shape[axis]
    if n == c:
        return block
    assert n < c, (n, c)
    pad = [(0, 0)] * block.ndim
    pad[axis] = (0, c - n)
    return np.pad(block, pad)


def _zstd(buf) -> bytes:
    from numcodecs.zstd import Zstd  # what zarr's ZstdCodec(level=0, checksum=False) calls

    return Zstd(level=0, checksum=False).encode(buf)


def write_key_shard(path: Path, keys_LnHD: np.ndarray, c: int, zstd: bool) -> None:
    """One shard file of ``keys``: every layer's rows of one ``c``-row block (n <= c rows given)."""
    block = _rows(keys_LnHD, c, axis=1)
    parts: list = []
    index = np.empty((block.shape[0], 2), dtype="<u8")
    offset = 0
    for li in range(block.shape[0]):
        data = _zstd(block[li]) if zstd else block[li]  # contiguous: a view, not a copy
        n = len(data) if zstd else data.nbytes
        parts += [data, _crc(data)]
        index[li] = offset, n + 4
        offset += n + 4
    parts += [index.tobytes(), _crc(index)]
    with open(path, "wb") as f:
        f.writelines(parts)


def write_table_chunk(path: Path, table_nF: np.ndarray, c: int) -> None:
    """One chunk file of ``tokens``: a ``c``-row block (n <= c rows given), zstd + crc32c."""
    data = _zstd(_rows(table_nF, c, axis=0))
    with open(path, "wb") as f:
        f.writelines([data, _crc(data)])


def file_crc32c(path: str | Path) -> str:
    """crc32c of a (small) file as 8 hex digits: what a marker records for each ``zarr.json``."""
    with open(path, "rb") as f:
        return f"{int(google_crc32c.value(f.read())):08x}"


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes its new entries durable; some filesystems refuse
    it on folders, then the rename is still atomic, only not yet durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _render(meta: dict) -> str:
    return json.dumps(meta, allow_nan=True, indent=2)  # zarr's json_indent default


def _write_text(path: Path, text: str) -> None:
    """Create or truncate ``path`` with ``text`` (ASCII: ``json.dumps`` escapes the rest)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = text.encode("ascii")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _write_json(path: Path, meta: dict) -> None:
    _write_text(path, _render(meta))


def write_group_meta(folder: Path, attributes: dict) -> None:
    """Create ``folder`` as a Zarr v3 group."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "zarr.json", {"attributes": attributes, "zarr_format": 3, "node_type": "group"})


def _array_meta(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...], dims: tuple[str, ...],
                attributes: dict, inner: tuple[int, ...] | None, zstd: bool) -> dict:
    """The dict zarr's metadata classes give for an array kscale writes (see ``write_array_meta``)."""
    codecs = [_BYTES, _ZSTD, _CRC] if zstd else [_BYTES, _CRC]
    if inner is not None:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(inner), "codecs": codecs, "index_codecs": [_BYTES, _CRC], "index_location": "end"}}]
    return {
        "shape": list(shape), "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": np.dtype(dtype).type(0).item(), "codecs": codecs, "attributes": attributes,
        "dimension_names": list(dims), "zarr_format": 3, "node_type": "array", "storage_transformers": []}


_SLOT = 7_340_032_000_000_000_000  # placeholders: no other number or text of an array's metadata looks like these


@functools.lru_cache(maxsize=256)
def _array_template(n_shape: int, dtype: str, n_chunks: int, dims: tuple[str, ...], attributes: str,
                    n_inner: int | None, zstd: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """An array's ``zarr.json`` cut at its sizes (shape, chunk shape, inner chunk shape): the text between
    them, and which size goes into each gap. Rendered once per kind of array, with placeholders for the
    sizes: they are plain integers, so filling them in gives ``json.dumps`` of the whole, byte for byte."""
    sizes = [_SLOT + i for i in range(n_shape + n_chunks + (n_inner or 0))]
    shape, chunks, inner = sizes[:n_shape], sizes[n_shape:n_shape + n_chunks], sizes[n_shape + n_chunks:]
    text = _render(_array_meta(tuple(shape), np.dtype(dtype), tuple(chunks), dims, json.loads(attributes),
                               None if n_inner is None else tuple(inner), zstd))
    at = sorted((text.index(str(v)), i) for i, v in enumerate(sizes))
    assert all(text.count(str(v)) == 1 for v in sizes) and len(str(_SLOT)) == len(str(sizes[-1]))
    parts, a = [], 0
    for pos, _ in at:
        parts.append(text[a:pos])
        a = pos + len(str(_SLOT))
    parts.append(text[a:])
    return tuple(parts), tuple(i for _, i in at)


def render_array_meta(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...], dims: tuple[str, ...],
                      attributes: dict, inner: tuple[int, ...] | None = None, zstd: bool = True) -> str:
    """``json.dumps(indent=2)`` of the array's metadata, from a cached template (the indented encoder is
    pure Python: ~0.2 ms per file, several files per shard)."""
    parts, order = _array_template(len(shape), np.dtype(dtype).str, len(chunks), tuple(dims),
                                   json.dumps(attributes), None if inner is None else len(inner), zstd)
    sizes = [*shape, *chunks, *(inner or ())]
    out = [parts[0]]
    for i, part in zip(order, parts[1:]):
        out += [str(int(sizes[i])), part]
    return "".join(out)


def write_array_meta(folder: Path, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                     dims: tuple[str, ...], attributes: dict, *, inner: tuple[int, ...] | None = None,
                     zstd: bool = True) -> None:
    """(Re)write ``folder/zarr.json``: chunk files of ``chunks`` (shards of ``inner`` chunks when given),
    ``bytes`` [+ zstd level 0] + crc32c, flat ``c.i.j`` chunk names, fill value 0."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / "zarr.json", render_array_meta(shape, dtype, chunks, dims, attributes, inner, zstd))
