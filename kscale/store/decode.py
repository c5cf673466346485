"""Chunk files of the arrays kscale writes, read without zarr's machinery: the reading half of ``chunks.py``.

Through zarr-python a read of one (shard, array) costs ~3-5 ms here whatever its bytes (opening the
metadata, the codec pipeline's async tasks per inner chunk, buffer prototypes), which made the analysis
at 10,000 shards of few tokens a cost per file, not per byte (docs/scale.md). :func:`read` decodes the
same files directly: the array's ``zarr.json`` (parsed once per distinct text), then for every file the
selection touches either the whole chunk (``bytes`` [+ zstd] + crc32c) or, for a shard of the sharding
codec, the index at the end of the file ((offset, nbytes) uint64 per inner chunk in C order, crc32c)
and one read per run of adjacent inner chunks it needs (one layer of ``keys``: one read).

Only what kscale writes is decoded: a Zarr v3 array with a regular grid, the default chunk key
encoding, ``bytes`` (little-endian) + optional zstd + crc32c, optionally inside ``sharding_indexed``
with ``bytes`` + crc32c index codecs at the end. Anything else raises :class:`Unsupported` *before any
data is read* (other codecs, another index location, an inner chunk the index marks empty, a selection
it does not understand), and the caller reads through zarr instead: zarr gives the fill value where
this decoder would otherwise have to guess. Damage is never decoded around: a checksum that does not
match raises the ``ValueError`` zarr's ``Crc32cCodec`` raises, a short file or an inner chunk of the
wrong size a ``ValueError`` too, a missing file ``FileNotFoundError``; the store's reader
(``reader.read_block``) names each as ``StoreDamaged``, as it does zarr's errors.
``tests/unit/test_store_decode.py`` compares every read with zarr's, byte for byte.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import google_crc32c
import numpy as np

MISSING = 2**64 - 1  # (offset, nbytes) of an inner chunk the sharding codec never wrote: its fill value
_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
           "float64"}


class Unsupported(Exception):
    """Metadata, a shard index entry or a selection this decoder does not decode: read it through zarr."""


@dataclass(frozen=True)
class Meta:
    """What :func:`read` needs from an array's ``zarr.json``; ``leaf`` is the shape one decoded chunk has
    (the inner chunk of a shard file, or the chunk itself)."""

    shape: tuple[int, ...]
    dtype: np.dtype  # little-endian
    chunks: tuple[int, ...]  # one file per chunk of the regular grid
    inner: tuple[int, ...] | None  # inner chunk shape of a sharded array
    zstd: bool  # inner (or plain) chunks zstd-compressed
    sep: str  # chunk key separator: c.0.1 or c/0/1

    @property
    def leaf(self) -> tuple[int, ...]:
        return self.inner or self.chunks


def _chain(codecs: Any, itemsize: int) -> bool:
    """Whether a codec list ``bytes`` [+ zstd] + crc32c has zstd; ``Unsupported`` for any other list."""
    names = [c.get("name") if isinstance(c, dict) else None for c in codecs] if isinstance(codecs, list) else None
    if names not in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"]):
        raise Unsupported(f"codecs {names}")
    endian = (codecs[0].get("configuration") or {}).get("endian")
    if endian != "little" and not (endian is None and itemsize == 1):
        raise Unsupported(f"bytes codec endian {endian!r}")
    return len(names) == 3


@lru_cache(maxsize=64)
def parse_meta(text: bytes) -> Meta:
    """The :class:`Meta` of a ``zarr.json`` (cached by its bytes: a store's arrays differ in their shape
    only); ``Unsupported`` unless it is an array of the kind this module decodes."""
    try:
        m = json.loads(text)
        if m.get("zarr_format") != 3 or m.get("node_type") != "array":
            raise Unsupported("not a Zarr v3 array")
        if m["data_type"] not in _DTYPES or m.get("storage_transformers"):
            raise Unsupported(f"data type {m['data_type']!r} or storage transformers")
        if m["chunk_grid"]["name"] != "regular" or m["chunk_key_encoding"]["name"] != "default":
            raise Unsupported("chunk grid or chunk key encoding")
        dtype = np.dtype(m["data_type"]).newbyteorder("<")
        shape, chunks = tuple(m["shape"]), tuple(m["chunk_grid"]["configuration"]["chunk_shape"])
        sep = (m["chunk_key_encoding"].get("configuration") or {}).get("separator", "/")
        codecs, inner = m["codecs"], None
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            if cfg.get("index_location", "end") != "end" or _chain(cfg["index_codecs"], 8):
                raise Unsupported("shard index not bytes + crc32c at the end")
            inner, codecs = tuple(cfg["chunk_shape"]), cfg["codecs"]
            if len(inner) != len(chunks) or any(c % i for c, i in zip(chunks, inner)):
                raise Unsupported(f"inner chunks {inner} do not divide {chunks}")
        zstd = _chain(codecs, dtype.itemsize)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise Unsupported(f"metadata: {type(e).__name__}: {e}") from None
    if len(shape) != len(chunks) or sep not in (".", "/") or not all(c > 0 for c in chunks):
        raise Unsupported("shape, chunks or separator")
    return Meta(shape, dtype, chunks, inner, zstd, sep)


def read_meta(path: str) -> Meta:
    """:func:`parse_meta` of ``path/zarr.json`` (``FileNotFoundError`` when there is none)."""
    with open(os.path.join(path, "zarr.json"), "rb") as f:
        return parse_meta(f.read())


def _checked(buf: bytes | memoryview) -> memoryview:
    """``buf`` without its trailing crc32c, after checking it (zarr's ``Crc32cCodec`` error when it differs)."""
    if len(buf) < 4:
        raise ValueError(f"chunk of {len(buf)} bytes, shorter than its checksum")
    data, stored = memoryview(buf)[:-4], bytes(buf[-4:])
    computed = np.uint32(google_crc32c.value(np.frombuffer(data, np.uint8))).tobytes()  # it refuses memoryviews
    if computed != stored:
        raise ValueError(f"Stored and computed checksum do not match. Stored: {stored!r}. Computed: {computed!r}.")
    return data


def _axis(sel: Any, size: int) -> int | slice | np.ndarray:
    """One axis of a selection, in absolute indices: an int, a slice with step >= 1, or an int array."""
    if isinstance(sel, (int, np.integer)):
        i = int(sel) + (size if sel < 0 else 0)
        if not 0 <= i < size:
            raise IndexError(f"index {int(sel)} out of bounds for size {size}")
        return i
    if isinstance(sel, slice):
        a, b, step = sel.indices(size)
        if step < 1:
            raise Unsupported("slice with a negative step")
        return slice(a, max(a, b), step)
    arr = np.asarray(sel)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise Unsupported(f"selection {type(sel).__name__} of dtype {arr.dtype}")
    arr = np.where(arr < 0, arr + size, arr).astype(np.int64)
    if len(arr) and (arr.min() < 0 or arr.max() >= size):
        raise IndexError(f"index out of bounds for size {size}")
    return arr


def _span(s: int | slice | np.ndarray) -> tuple[int, int]:
    """[first, last + 1) of the indices ``s`` takes (empty: (0, 0))."""
    if isinstance(s, int):
        return s, s + 1
    if isinstance(s, slice):
        return (s.start, s.stop) if s.stop > s.start else (0, 0)
    return (int(s.min()), int(s.max()) + 1) if len(s) else (0, 0)


def _leaves(s: int | slice | np.ndarray, c: int) -> list[int]:
    """Indices of the leaf chunks (length ``c``) along one axis that ``s`` takes from."""
    if isinstance(s, int):
        return [s // c]
    if isinstance(s, slice):
        if s.step == 1 or s.step < c:
            a, b = _span(s)
            return list(range(a // c, -(-b // c))) if b > a else []
        return sorted({i // c for i in range(s.start, s.stop, s.step)})
    return sorted({int(i) // c for i in s})


def read(path: str, meta: Meta, sel: tuple) -> np.ndarray:
    """``array[sel]`` of the array at ``path`` described by ``meta``, as zarr would return it (orthogonal
    indexing: ints, slices with a positive step, int lists; a bare ``...`` for everything). Reads only the
    leaf chunks the selection touches, into a box spanning them, then indexes the box."""
    if any(s is Ellipsis for s in sel):
        if sel != (Ellipsis,):
            raise Unsupported("an Ellipsis among other indices")
        sel = ()
    if len(sel) > len(meta.shape):
        raise IndexError(f"too many indices for an array of {len(meta.shape)} dimensions")
    sel = tuple(_axis(s, n) for s, n in zip(sel + (slice(None),) * (len(meta.shape) - len(sel)), meta.shape))
    leaf = meta.leaf
    grid = [_leaves(s, c) for s, c in zip(sel, leaf)]
    lo = [g[0] if g else 0 for g in grid]
    box = np.empty([(g[-1] - g[0] + 1) * c if g else 0 for g, c in zip(grid, leaf)], meta.dtype)
    per_file = max(1, math.prod(c // lf for c, lf in zip(meta.chunks, leaf)))
    files: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for ix in itertools.product(*grid):
        files.setdefault(tuple(i * lf // c for i, lf, c in zip(ix, leaf, meta.chunks)), []).append(ix)
    for outer, ixs in files.items():
        name = os.path.join(path, "c" + "".join(meta.sep + str(i) for i in outer) if outer else "c")
        for ix, buf in _read_file(name, meta, outer, ixs, per_file):
            part = _decode(buf, meta)
            box[tuple(slice((i - l0) * c, (i - l0 + 1) * c) for i, l0, c in zip(ix, lo, leaf))] = part
    return _take(box, sel, [l0 * c for l0, c in zip(lo, leaf)])


def _read_file(name: str, meta: Meta, outer: tuple[int, ...], ixs: list[tuple[int, ...]],
               per_file: int) -> list[tuple[tuple[int, ...], memoryview]]:
    """The encoded leaf chunks ``ixs`` (array-wide leaf indices) of the chunk file ``name``: the whole file
    for an unsharded array; else its index (checked) and one read per run of adjacent inner chunks."""
    with open(name, "rb") as f:
        if meta.inner is None:
            return [(ixs[0], memoryview(f.read()))]
        n_index = per_file * 16 + 4
        size = os.fstat(f.fileno()).st_size
        if size < n_index:
            raise ValueError(f"shard file of {size} bytes, shorter than its index ({n_index} bytes)")
        f.seek(size - n_index)
        index = np.frombuffer(_checked(f.read(n_index)), "<u8").reshape(-1, 2)
        per_axis = [c // i for c, i in zip(meta.chunks, meta.inner)]
        where = []
        for ix in ixs:
            k = int(np.ravel_multi_index([i - o * p for i, o, p in zip(ix, outer, per_axis)], per_axis))
            off, n = int(index[k, 0]), int(index[k, 1])
            if off == MISSING and n == MISSING:
                raise Unsupported(f"inner chunk {ix} of {name} not written (its fill value)")
            if off + n > size - n_index or n < 4:
                raise ValueError(f"inner chunk {ix} at bytes [{off}, {off + n}) outside the file's "
                                 f"{size - n_index} data bytes")
            where.append((off, n, ix))
        where.sort()
        out = []
        run: list[tuple[int, int, tuple[int, ...]]] = []
        for w in [*where, None]:  # runs of inner chunks that follow each other in the file: one read each
            if run and (w is None or w[0] != run[-1][0] + run[-1][1]):
                f.seek(run[0][0])
                buf = memoryview(f.read(run[-1][0] + run[-1][1] - run[0][0]))
                out += [(ix, buf[off - run[0][0]:off - run[0][0] + n]) for off, n, ix in run]
                run = []
            if w is not None:
                run.append(w)
        return out


def _decode(buf: memoryview, meta: Meta) -> np.ndarray:
    """One leaf chunk: crc32c checked, zstd undone, the bytes as an array of the leaf's shape."""
    data = _checked(buf)
    if meta.zstd:
        from numcodecs.zstd import Zstd  # what zarr's ZstdCodec calls

        data = memoryview(Zstd().decode(data))
    want = math.prod(meta.leaf) * meta.dtype.itemsize
    if len(data) != want:
        raise ValueError(f"chunk of {len(data)} bytes, expected {want}")
    return np.frombuffer(data, meta.dtype).reshape(meta.leaf)


def _take(box: np.ndarray, sel: tuple, origin: list[int]) -> np.ndarray:
    """``sel`` (absolute indices) applied to ``box`` (whose first element is at ``origin``), orthogonally."""
    basic, lists = [], []
    for s, o in zip(sel, origin):
        if isinstance(s, int):
            basic.append(s - o)
        elif isinstance(s, slice):
            basic.append(slice(s.start - o, s.stop - o, s.step) if s.stop > s.start else slice(0, 0))
        else:
            lists.append((sum(1 for b in basic if not isinstance(b, int)), s - o))
            basic.append(slice(None))
    out = box[tuple(basic)]
    for axis, idx in lists:
        out = np.take(out, idx, axis=axis)
    return np.array(out, order="C")  # a copy: the box goes (ascontiguousarray would make a 0-d result 1-d)
