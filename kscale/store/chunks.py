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


def file_crc32c(path: Path) -> str:
    """crc32c of a (small) file as 8 hex digits: what a marker records for each ``zarr.json``."""
    return f"{int(google_crc32c.value(path.read_bytes())):08x}"


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


def _write_json(path: Path, meta: dict) -> None:
    path.write_text(json.dumps(meta, allow_nan=True, indent=2))  # zarr's json_indent default


def write_group_meta(folder: Path, attributes: dict) -> None:
    """Create ``folder`` as a Zarr v3 group."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "zarr.json", {"attributes": attributes, "zarr_format": 3, "node_type": "group"})


def write_array_meta(folder: Path, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                     dims: tuple[str, ...], attributes: dict, *, inner: tuple[int, ...] | None = None,
                     zstd: bool = True) -> None:
    """(Re)write ``folder/zarr.json``: chunk files of ``chunks`` (shards of ``inner`` chunks when given),
    ``bytes`` [+ zstd level 0] + crc32c, flat ``c.i.j`` chunk names, fill value 0."""
    codecs = [_BYTES, _ZSTD, _CRC] if zstd else [_BYTES, _CRC]
    if inner is not None:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(inner), "codecs": codecs, "index_codecs": [_BYTES, _CRC], "index_location": "end"}}]
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "zarr.json", {
        "shape": list(shape), "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": np.dtype(dtype).type(0).item(), "codecs": codecs, "attributes": attributes,
        "dimension_names": list(dims), "zarr_format": 3, "node_type": "array", "storage_transformers": []})
