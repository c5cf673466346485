"""Read a key store: lazy dask arrays of keys and token columns, the token table, errors and a summary.

Only committed shards are visible: ``open_store`` takes them from the store index (``index.py``,
rebuilt from the markers when stale). ``keys(layer, modality)`` concatenates the shards' rows for that
layer in shard order, and ``token_column``/``tokens`` give the token table in the same order, so row i
of one is row i of the other. ``layer`` is the model's layer index, not a position in the stored list.

Layout-2 shards (``layout.py``) become dask graphs built directly from the index rows: one task per
(shard, ``chunk_tokens`` block) that opens and reads its Zarr shard file only when computed, so
building ``keys(layer, modality)`` over 10,000 shards touches no file. A task refuses a missing,
truncated or damaged file with ``StoreDamaged`` (store, shard, array, chunk): the file must exist (a
missing chunk never reads as Zarr's fill value) and every chunk carries a crc32c. Everything read through
Zarr's metadata (side tables such as ``attention``, layout-1 shards of stores written before format 2)
goes through :class:`CheckedArray`, which refuses a missing chunk file the same way.
Post-RoPE keys (``rope=True``) and stored queries come from :mod:`kscale.store.rope` and
:mod:`kscale.store.queries`, imported when asked (they need torch).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from kscale.store import decode
from kscale.store.index import Index, load_index, shard_errors, summarize
from kscale.store.layout import (COLUMN_FILL, MODALITIES, TABLE_COLUMNS, VIDEO_FIELDS, StoreError, field_slice,
                                 keys_chunk_file, read_marker, read_root_attrs, shard_dir, store_token_fields,
                                 store_vectors, token_fields, tokens_chunk_file)


class StoreDamaged(StoreError):
    """A committed shard's file is missing, truncated or fails its checksum, or its marker is unreadable.
    ``kscale verify STORE --repair`` un-commits such shards so that a rerun of the extraction redoes them."""

    def __init__(self, store: str, shard: str, array: str = "", chunk: str = "", reason: str = ""):
        self.store, self.shard, self.array, self.chunk, self.reason = store, shard, array, chunk, reason
        where = "/".join(x for x in (shard, array) if x) + (f" chunk {chunk}" if chunk else "")
        super().__init__(f"store {store}: shard {where} is damaged: {reason} "
                         f"(`kscale verify {store} --repair`, then rerun the extraction)")

    def __reduce__(self):  # picklable across dask workers
        return StoreDamaged, (self.store, self.shard, self.array, self.chunk, self.reason)


@lru_cache(maxsize=512)
def _open_array(path: str, shape: tuple[int, ...]) -> zarr.Array:
    arr = zarr.open_array(path, mode="r")
    if tuple(arr.shape) != shape:
        raise ValueError(f"shape {tuple(arr.shape)} differs from the marker's {shape}")
    return arr


DIRECT_READS = True  # read_block decodes kscale's chunk files itself (kscale.store.decode); False: zarr-python


def read_block(store: str, shard: str, array: str, file: str, shape: tuple[int, ...], sel: tuple,
               dtype: str) -> np.ndarray:
    """One task of a layout-2 graph: ``STORE/shards/<shard>/<array>[sel]`` read from ``file`` only. Decoded
    directly when ``DIRECT_READS`` (~0.1 ms instead of zarr's ~3-5 ms per read), through zarr for what the
    decoder does not decode (``decode.Unsupported``) or when the switch is off; damage is ``StoreDamaged``
    either way."""
    path = os.path.join(store, "shards", shard, array)
    if DIRECT_READS:
        try:
            meta = decode.read_meta(path)
            if meta.shape != shape:
                raise ValueError(f"shape {meta.shape} differs from the marker's {shape}")
            return np.asarray(decode.read(path, meta, sel), dtype=dtype)
        except decode.Unsupported:
            pass  # zarr decodes it (other codecs, fill values)
        except FileNotFoundError as e:
            missing = file if not os.path.isfile(os.path.join(path, file)) else os.path.basename(e.filename or "")
            raise StoreDamaged(store, shard, array, missing, "file missing") from None
        except Exception as e:  # noqa: BLE001 - any decode failure is this chunk's damage, named
            raise StoreDamaged(store, shard, array, file, f"{type(e).__name__}: {e}") from None
    if not os.path.isfile(os.path.join(path, file)):
        raise StoreDamaged(store, shard, array, file, "file missing")
    try:
        return np.asarray(_open_array(path, shape)[sel], dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any decode failure is this chunk's damage, named
        raise StoreDamaged(store, shard, array, file, f"{type(e).__name__}: {e}") from None


def _chunk_range(sel: Any, size: int, c: int) -> range | list[int]:
    """Chunk indices (along one axis of chunk length ``c``) that ``sel`` (an int, slice or index list) touches."""
    if isinstance(sel, slice):
        a, b, _ = sel.indices(size)
        return range(a // c, -(-b // c)) if b > a else range(0)
    if isinstance(sel, (int, np.integer)):
        return [int(sel) % size // c] if size else []
    return sorted({int(i) % size // c for i in np.asarray(sel).ravel()})


class CheckedArray:
    """A Zarr array of one shard that refuses to read a chunk whose file is missing (Zarr would return its
    fill value, zeros) and names any decode failure: ``StoreDamaged(store, shard, array, chunk)``. Side
    tables, layout-1 arrays and everything else kscale reads through Zarr's metadata go through it; dask
    reads it block by block (``da.from_array``). Picklable (it holds paths and a zarr array)."""

    def __init__(self, store: str, shard: str, array: str, listed: frozenset[str] | None = None,
                 sparse: bool = False):
        """``listed``: the chunk files the shard's marker lists for this array (layout 2); a listed file must
        exist, an unlisted one was never written (an all-zero chunk of a table written before kscale wrote
        every chunk) and reads as zeros. Without a list (layout 1) every chunk file must exist, unless
        ``sparse`` (layout-1 side tables, whose all-zero chunks were never written)."""
        self.store, self.shard, self.array = store, shard, array
        self.listed, self.sparse = listed, sparse
        path = os.path.join(store, "shards", shard, array)
        if not os.path.isfile(os.path.join(path, "zarr.json")):
            raise StoreDamaged(store, shard, array, "zarr.json", "file missing")
        try:
            self.arr = zarr.open_array(path, mode="r")
        except Exception as e:  # noqa: BLE001 - metadata that does not open, named
            raise StoreDamaged(store, shard, array, "zarr.json", f"{type(e).__name__}: {e}") from None
        self.path, self.shape, self.dtype = path, tuple(self.arr.shape), self.arr.dtype
        self.ndim, self.chunks = len(self.shape), tuple(self.arr.shards or self.arr.chunks)

    def __getitem__(self, sel: Any) -> np.ndarray:
        sel = sel if isinstance(sel, tuple) else (sel,)
        if any(s is Ellipsis for s in sel):
            sel = tuple(slice(None) for _ in self.shape)
        sel = sel + (slice(None),) * (self.ndim - len(sel))
        grid = [_chunk_range(x, n, c) for x, n, c in zip(sel, self.shape, self.chunks)]
        for ix in itertools.product(*grid):
            key = self.arr.metadata.encode_chunk_key(ix)
            required = key in self.listed if self.listed is not None else not self.sparse
            if required and not os.path.isfile(os.path.join(self.path, key)):
                raise StoreDamaged(self.store, self.shard, self.array, key, "file missing")
        try:
            return np.asarray(self.arr[sel])
        except Exception as e:  # noqa: BLE001 - any decode failure is this array's damage, named
            raise StoreDamaged(self.store, self.shard, self.array, "", f"{type(e).__name__}: {e}") from None

    def __dask_tokenize__(self) -> tuple:
        return ("kscale-checked", self.path, self.shape, str(self.dtype), self.chunks)

    def lazy(self) -> da.Array:
        """The whole array as dask, one block per chunk file, each checked when read."""
        return da.from_array(self, chunks=self.chunks, asarray=False, fancy=False)


def _blocks(n: int, c: int) -> list[tuple[int, int, int]]:
    return [(i, i * c, min(n, (i + 1) * c)) for i in range(math.ceil(n / c))]


# --- coarse reads: one task reads a run of shards ------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """Rows [a, b) of one committed shard's modality (``n`` rows in all): the part of a coarse read that
    falls in that shard. Small and picklable: a task carries its spans, never the store's index."""

    shard: str
    layout: int
    n: int
    chunk_tokens: int | None
    a: int
    b: int


@dataclass(frozen=True)
class KeysSel:
    """What a coarse read takes from each span's ``keys``: one layer (position in the stored list), heads."""

    layer_pos: int
    shape_LHD: tuple[int, int, int]
    heads: tuple[int, ...] | None  # positions in the stored heads; None: all
    dtype: str

    def read(self, store: str, modality: str, s: Span) -> list[np.ndarray]:
        L, H, D = self.shape_LHD
        hs = slice(None) if self.heads is None else list(self.heads)
        if s.layout == 1:
            return [_read_v1(store, s.shard, f"{modality}/keys", (self.layer_pos, slice(s.a, s.b), hs), self.dtype)]
        return [read_block(store, s.shard, f"{modality}/keys", keys_chunk_file(i), (L, s.n, H, D),
                           (self.layer_pos, slice(a, b), hs), self.dtype) for i, a, b in _pieces(s)]

    def empty(self) -> np.ndarray:
        L, H, D = self.shape_LHD
        return np.zeros((0, H if self.heads is None else len(self.heads), D), self.dtype)


@dataclass(frozen=True)
class ColumnSel:
    """What a coarse read takes from each span's token table: one column (``TABLE_COLUMNS``)."""

    name: str
    rope_rows: int
    fields: tuple[str, ...] = ()  # the store's token fields (``store_token_fields``)

    def read(self, store: str, modality: str, s: Span) -> list[np.ndarray]:
        dtype = TABLE_COLUMNS[self.name]
        fields = self.fields or token_fields(self.rope_rows)
        if self.name != "rope_pos" and self.name not in fields:  # a column the store predates
            return [np.full(s.b - s.a, COLUMN_FILL, dtype)]
        if s.layout == 1:
            return [_read_v1(store, s.shard, f"{modality}/{self.name}", (slice(s.a, s.b),), dtype)]
        fs = field_slice(self.name, self.rope_rows, fields)
        col = fs if self.name == "rope_pos" else fs.start
        return [read_block(store, s.shard, f"{modality}/tokens", tokens_chunk_file(i), (s.n, len(fields)),
                           (slice(a, b), col), dtype) for i, a, b in _pieces(s)]

    def empty(self) -> np.ndarray:
        R = self.rope_rows
        return np.zeros((0, R) if self.name == "rope_pos" else (0,), TABLE_COLUMNS[self.name])


def _pieces(s: Span) -> list[tuple[int, int, int]]:
    """(chunk index, a, b) of the ``chunk_tokens`` blocks that rows [s.a, s.b) of a layout-2 shard touch."""
    c = s.chunk_tokens
    return [(i, max(s.a, i * c), min(s.b, (i + 1) * c)) for i in range(s.a // c, -(-s.b // c))]


def _read_v1(store: str, shard: str, array: str, sel: tuple, dtype: str) -> np.ndarray:
    return np.asarray(CheckedArray(store, shard, array)[sel], dtype=dtype)


def read_spans(store: str, modality: str, spans: tuple[Span, ...], what: KeysSel | ColumnSel,
               take: np.ndarray | None = None) -> np.ndarray:
    """One coarse task: the rows of ``spans`` concatenated in order (then ``[take]`` when given), read
    chunk by chunk with the damage checks of :func:`read_block`."""
    parts = [p for s in spans for p in what.read(store, modality, s)]
    out = np.concatenate(parts) if parts else what.empty()
    return out if take is None else out[take]


class _CoarseRead:
    """The arguments of one :func:`read_spans` task, packed in one object that dask does not look into: dask
    walks a task's arguments for collections, into tuples and dataclasses, and a coarse read's ~100 spans
    cost ~2,000 such visits per task, more than its file reads at 16 rows per shard (docs/scale.md)."""

    __slots__ = ("store", "modality", "spans", "what", "take")

    def __init__(self, store: str, modality: str, spans: tuple[Span, ...], what: KeysSel | ColumnSel,
                 take: np.ndarray | None):
        self.store, self.modality, self.spans, self.what, self.take = store, modality, spans, what, take


def _run_coarse_read(r: _CoarseRead) -> np.ndarray:
    return read_spans(r.store, r.modality, r.spans, r.what, r.take)


def coarse_read(store: str, modality: str, spans: tuple[Span, ...], what: KeysSel | ColumnSel,
                take: np.ndarray | None = None) -> Any:
    """:func:`read_spans` as one delayed task (not pure: a key of its own, nothing tokenized)."""
    return dask.delayed(_run_coarse_read, pure=False)(_CoarseRead(store, modality, spans, what, take))


@dataclass
class KeyStore:
    path: str
    attrs: dict[str, Any]
    index: Index
    _starts: dict[str, tuple[list[dict], np.ndarray]] = field(default_factory=dict, init=False, repr=False,
                                                               compare=False)

    @property
    def shards(self) -> dict[str, dict]:
        """Committed shard name -> index row (``index.index_row``)."""
        return self.index.rows

    @property
    def layers(self) -> list[int]:
        return list(self.attrs["layers"])

    @property
    def heads(self) -> list[int]:
        return list(self.attrs["heads"])

    @property
    def head_dim(self) -> int:
        return int(self.attrs["head_dim"])

    @property
    def rope_rows(self) -> int:
        return int(self.attrs["rope_rows"])

    @property
    def token_fields(self) -> tuple[str, ...]:
        """Fields of this store's token tables (video columns only in stores written since videos)."""
        return store_token_fields(self.attrs)

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES

    def _layer_pos(self, layer: int) -> int:
        if layer not in self.layers:
            raise StoreError(f"layer {layer} is not in store {self.path} (layers: {self.layers})")
        return self.layers.index(layer)

    def _check_valid(self) -> None:
        if self.index.invalid:
            name, reason = next(iter(self.index.invalid.items()))
            raise StoreDamaged(self.path, name, "", "", f"marker unreadable: {reason}"
                               + (f" (and {len(self.index.invalid) - 1} more shards)" if len(self.index.invalid) > 1
                                  else ""))

    def _runs(self, modality: str) -> list[tuple[int, list[dict]]]:
        """Shards holding ``modality``, grouped into consecutive runs of one layout."""
        self._check_modality(modality)
        self._check_valid()
        out: list[tuple[int, list[dict]]] = []
        for row in self.index.rows.values():
            if not row["tokens"][modality]:
                continue
            if out and out[-1][0] == row["layout"]:
                out[-1][1].append(row)
            else:
                out.append((row["layout"], [row]))
        return out

    def _direct(self, kind: str, rows: list[dict], modality: str, trail: tuple[int, ...], dtype: str,
                sel_fn, what: Any) -> da.Array:
        """A dask array over layout-2 shards, one task per (shard, chunk_tokens block), built from rows;
        ``sel_fn(i, a, b, n)`` names the array (path in the shard), file, full shape and selection of
        block i; ``what``
        tells apart graphs of one kind (layer and heads, or column)."""
        name = f"kscale-{kind}-" + tokenize(self.path, modality, kind, trail, dtype, what,
                                             [(r["name"], r["tokens"][modality], r["chunk_tokens"]) for r in rows])
        dsk, sizes = {}, []
        for r in rows:
            n, c = r["tokens"][modality], r["chunk_tokens"]
            for i, a, b in _blocks(n, c):
                array, file, shape, sel = sel_fn(i, a, b, n)
                idx = (name, len(sizes)) + (0,) * len(trail)
                dsk[idx] = (read_block, self.path, r["name"], array, file, shape, sel, dtype)
                sizes.append(b - a)
        chunks = (tuple(sizes), *((t,) for t in trail))
        return da.Array(HighLevelGraph.from_collections(name, dsk, dependencies=()), name, chunks, dtype=dtype)

    def _shard_array(self, shard: str, modality: str, array: str) -> CheckedArray:
        return CheckedArray(self.path, shard, f"{modality}/{array}")

    def _keys_sel(self, layer: int, heads: list[int] | None) -> KeysSel:
        li = self._layer_pos(layer)
        if heads is not None:
            missing = [h for h in heads if h not in self.heads]
            if missing:
                raise StoreError(f"KV heads {missing} are not in store {self.path} (heads: {self.heads})")
        hsel = None if heads is None else tuple(self.heads.index(h) for h in heads)
        return KeysSel(li, (len(self.layers), len(self.heads), self.head_dim), hsel, self.attrs["key_dtype"])

    def keys(self, layer: int, modality: str, heads: list[int] | None = None, rope: bool = False) -> da.Array:
        """(N, H, D) keys of one layer and modality, lazily, over all committed shards.

        Stored keys are pre-RoPE; ``rope=True`` rebuilds the post-RoPE keys the model attended with, from
        the stored positions and the model's own rotary embedding (built from its config.json).
        """
        ksel = self._keys_sel(layer, heads)
        li, hsel = ksel.layer_pos, ksel.heads
        H, D, L = len(self.heads), self.head_dim, len(self.layers)
        dtype = ksel.dtype
        parts = []
        for layout, rows in self._runs(modality):
            if layout == 1:
                for r in rows:
                    p = self._shard_array(r["name"], modality, "keys").lazy()[li]
                    parts.append(p if hsel is None else p[:, list(hsel)])
                continue

            def sel(i, a, b, n):
                hs = slice(None) if hsel is None else list(hsel)
                return f"{modality}/keys", keys_chunk_file(i), (L, n, H, D), (li, slice(a, b), hs)
            parts.append(self._direct("keys", rows, modality, (H if hsel is None else len(hsel), D), dtype, sel,
                                      (li, hsel)))
        Hs = H if hsel is None else len(hsel)
        out = da.concatenate(parts, axis=0) if parts else da.zeros((0, Hs, D), dtype=dtype)
        if rope:
            from kscale.models.rope import rotary_for_layer
            from kscale.store.rope import rope_lazy, store_rotary

            out = rope_lazy(out, self.token_column(modality, "rope_pos"), rotary_for_layer(store_rotary(self), layer))
        return out

    def to_xarray(self, layer: int, modality: str, heads: list[int] | None = None, rope: bool = False):
        """``keys(layer, modality, heads, rope)`` as a lazy (dask-backed) ``xarray.DataArray`` named ``key``.

        Dims ``(token, kv_head, head_dim)``; coordinates ``kv_head`` (the model's KV head ids), ``head_dim``,
        scalar ``layer`` and ``modality``, and per token the (lazy) columns of the token table
        (``sample_id``, ``position``, ``token_id``, ``image_index``, ``rope_0``..``rope_{R-1}``), aligned
        row for row: ``a.isel(token=(a.sample_id == 3).values)`` is one sample's keys, no join.
        xarray is optional: ``pip install 'kscale[analysis]'``."""
        xr = _import_xarray()
        keys = self.keys(layer, modality, heads, rope)
        heads = self.heads if heads is None else list(heads)
        coords: dict[str, Any] = {"layer": layer, "modality": modality, "kv_head": ("kv_head", heads),
                                  "head_dim": ("head_dim", np.arange(self.head_dim))}
        for name in TABLE_COLUMNS:
            col = self.token_column(modality, name)
            if name == "rope_pos":
                coords.update({f"rope_{r}": ("token", col[:, r]) for r in range(self.rope_rows)})
            else:
                coords[name] = ("token", col)
        attrs = {"store": self.path, "rope": "post-RoPE (rebuilt)" if rope else "pre-RoPE (stored)",
                 "key_dtype": self.attrs["key_dtype"]}
        return xr.DataArray(keys, dims=("token", "kv_head", "head_dim"), coords=coords, name="key", attrs=attrs)

    @property
    def vector_kinds(self) -> tuple[str, ...]:
        """The kinds of vectors the store holds ("q", "k", "v"; ``extract.vectors``)."""
        return store_vectors(self.attrs)

    def vectors(self, kind: str, layer: int, modality: str, heads: list[int] | None = None,
                rope: bool = False) -> da.Array:
        """(N, H, D) stored ``kind`` vectors ("q", "k" or "v") of one layer and modality, rows aligned with
        ``keys``; ``heads`` are the model's query heads for q, KV heads for k and v; ``rope`` rotates q or k
        (values have none). ``keys(...)`` is ``vectors("k", ...)`` (:mod:`kscale.store.queries`)."""
        if kind == "k":
            return self.keys(layer, modality, heads, rope)
        from kscale.store.queries import read_vectors

        return read_vectors(self, kind, layer, modality, heads, rope)

    def queries(self, layer: int, modality: str, rope: bool = False) -> da.Array:
        """Stored query vectors of every stored query head: ``vectors("q", layer, modality, rope=rope)``."""
        return self.vectors("q", layer, modality, rope=rope)

    def token_column(self, modality: str, name: str) -> da.Array:
        """One token column, lazily: (N,) or (N, R) for ``rope_pos``, chunked like ``keys``' token axis
        (one block per shard and ``chunk_tokens`` rows), rows aligned with ``keys(layer, modality)``."""
        if name not in TABLE_COLUMNS:
            raise StoreError(f"unknown token column {name!r} (choose from {', '.join(TABLE_COLUMNS)})")
        R, dtype, fields = self.rope_rows, TABLE_COLUMNS[name], self.token_fields
        if name != "rope_pos" and name not in fields:  # a column the store predates: the fill value
            return self.token_column(modality, "sample_id").map_blocks(
                lambda b: np.full(b.shape, COLUMN_FILL, dtype), dtype=dtype)
        fs = field_slice(name, R, fields)
        parts = []
        for layout, rows in self._runs(modality):
            if layout == 1:
                for r in rows:
                    parts.append(self._shard_array(r["name"], modality, name).lazy())
                continue

            def sel(i, a, b, n):
                return (f"{modality}/tokens", tokens_chunk_file(i), (n, len(fields)),
                        (slice(a, b), fs if name == "rope_pos" else fs.start))
            parts.append(self._direct(f"col-{name}", rows, modality, (R,) if name == "rope_pos" else (), dtype, sel,
                                      name))
        if not parts:
            return da.zeros((0, R) if name == "rope_pos" else (0,), dtype=dtype)
        return da.concatenate(parts, axis=0)

    # coarse reads (the analysis): rows [lo, hi) of a modality as ONE task over a run of shards, and
    # gathers of scattered rows in a few tasks; built from the index's row offsets, no file opened

    def _row_starts(self, modality: str) -> tuple[list[dict], np.ndarray]:
        """Committed shards' index rows and the first row of ``modality`` in each (then the total)."""
        if modality not in self._starts:
            self._check_modality(modality)
            self._check_valid()
            rows = list(self.index.rows.values())
            n = np.array([r["tokens"][modality] for r in rows], np.int64)
            self._starts[modality] = (rows, np.concatenate([[0], np.cumsum(n)]))
        return self._starts[modality]

    def spans(self, modality: str, lo: int, hi: int) -> tuple[Span, ...]:
        """The parts of committed shards that rows [lo, hi) of ``modality`` (rows as in ``keys``) fall in."""
        rows, starts = self._row_starts(modality)
        if not 0 <= lo <= hi <= starts[-1]:
            raise IndexError(f"store {self.path}: rows [{lo}, {hi}) outside the {starts[-1]} {modality} rows")
        out = []
        k = max(0, int(np.searchsorted(starts, lo, "right")) - 1)
        while k < len(rows) and starts[k] < hi:
            a, b = max(lo, starts[k]) - starts[k], min(hi, starts[k + 1]) - starts[k]
            if b > a:
                r = rows[k]
                out.append(Span(r["name"], r["layout"], int(starts[k + 1] - starts[k]), r["chunk_tokens"],
                                int(a), int(b)))
            k += 1
        return tuple(out)

    def keys_rows(self, layer: int, modality: str, lo: int, hi: int, heads: list[int] | None = None) -> Any:
        """Keys rows [lo, hi) of one layer as one delayed task (``(hi - lo, H, D)``) that reads a run of
        shards: what the analysis streams, so its graph and task count follow its blocks, not the shards."""
        return coarse_read(self.path, modality, self.spans(modality, lo, hi), self._keys_sel(layer, heads))

    def column_rows(self, modality: str, name: str, lo: int, hi: int) -> Any:
        """Token column rows [lo, hi) as one delayed task, aligned with :meth:`keys_rows`."""
        return coarse_read(self.path, modality, self.spans(modality, lo, hi), self._column_sel(name))

    def keys_at(self, layer: int, modality: str, index: np.ndarray, heads: list[int] | None = None) -> np.ndarray:
        """Keys rows ``index`` (any order, repeats allowed) of one layer, read in a few coarse tasks."""
        return self._gather(modality, self._keys_sel(layer, heads), index)

    def column_at(self, modality: str, name: str, index: np.ndarray) -> np.ndarray:
        """Token column rows ``index``, as :meth:`keys_at`."""
        return self._gather(modality, self._column_sel(name), index)

    def _column_sel(self, name: str) -> ColumnSel:
        if name not in TABLE_COLUMNS:
            raise StoreError(f"unknown token column {name!r} (choose from {', '.join(TABLE_COLUMNS)})")
        return ColumnSel(name, self.rope_rows, self.token_fields)

    def _gather(self, modality: str, what: KeysSel | ColumnSel, index: np.ndarray,
                rows_per_task: int = 65536, pieces_per_task: int = 256) -> np.ndarray:
        """Rows ``index``: sorted, cut into pieces (shard, ``chunk_tokens`` block) that each read only the
        rows between their first and last wanted row, and pieces grouped into tasks of at most
        ``pieces_per_task`` pieces and ~``rows_per_task`` rows read; a task returns only its wanted rows."""
        rows, starts = self._row_starts(modality)
        index = np.asarray(index, np.int64)
        if len(index) and (index.min() < 0 or index.max() >= starts[-1]):
            raise IndexError(f"store {self.path}: row index outside the {starts[-1]} {modality} rows")
        if not len(index):
            return read_spans(self.path, modality, (), what)
        order = np.argsort(index, kind="stable")
        idx = index[order]
        k = np.searchsorted(starts, idx, "right") - 1
        local = idx - starts[k]
        block = local // np.array([r["chunk_tokens"] or 4096 for r in rows], np.int64)[k]
        first = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (block[1:] != block[:-1])])  # pieces
        last = np.r_[first[1:], len(idx)] - 1
        a, b = local[first], local[last] + 1
        spans = [Span(rows[kk]["name"], rows[kk]["layout"], int(starts[kk + 1] - starts[kk]), rows[kk]["chunk_tokens"],
                      int(aa), int(bb)) for kk, aa, bb in zip(k[first], a, b)]
        group = np.cumsum(b - a) // rows_per_task, np.arange(len(spans)) // pieces_per_task
        cuts = [0, *np.flatnonzero((np.diff(group[0]) > 0) | (np.diff(group[1]) > 0)) + 1, len(spans)]
        tasks = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):  # pieces [lo, hi): wanted rows first[lo] .. last[hi - 1]
            piece = np.repeat(np.arange(lo, hi), last[lo:hi] - first[lo:hi] + 1)
            base = np.concatenate([[0], np.cumsum(b[lo:hi] - a[lo:hi])])[piece - lo]
            take = base + local[first[lo]:last[hi - 1] + 1] - a[piece]
            tasks.append(coarse_read(self.path, modality, tuple(spans[lo:hi]), what, take))
        got = np.concatenate(dask.compute(*tasks))
        out = np.empty_like(got)
        out[order] = got
        return out

    def tokens(self, modality: str) -> dict[str, np.ndarray]:
        """Token table of one modality in memory, rows aligned with ``keys(layer, modality)`` (for large
        stores prefer ``token_column``, which streams)."""
        runs = self._runs(modality)
        if all(layout == 1 for layout, _ in runs):
            return self._tokens_v1(modality)
        cols = dict(zip(TABLE_COLUMNS, da.compute(*[self.token_column(modality, k) for k in TABLE_COLUMNS])))
        return {k: np.asarray(v) for k, v in cols.items()}

    def _tokens_v1(self, modality: str) -> dict[str, np.ndarray]:
        cols: dict[str, list[np.ndarray]] = {k: [] for k in TABLE_COLUMNS}
        for name in self.shards:
            d = shard_dir(self.path, name) / modality
            if not d.is_dir():
                continue
            for k in TABLE_COLUMNS:
                if k in VIDEO_FIELDS:  # layout-1 shards predate video: the column reads as the fill
                    cols[k].append(np.full(len(cols["sample_id"][-1]), COLUMN_FILL, TABLE_COLUMNS[k]))
                else:
                    cols[k].append(self._shard_array(name, modality, k)[:])
        R = self.rope_rows
        return {k: (np.concatenate(v) if v else np.zeros((0, R) if k == "rope_pos" else (0,), dtype=TABLE_COLUMNS[k]))
                for k, v in cols.items()}

    def table(self, name: str) -> dict[str, np.ndarray]:
        """A per-shard side table (e.g. "attention") concatenated over committed shards. Its columns are the
        arrays the shard's marker lists (layout 2; layout 1: those in the folder), each read whole through
        :class:`CheckedArray`: a missing column, metadata or chunk file is ``StoreDamaged``, never zeros,
        and every shard must hold the same columns."""
        self._check_valid()
        cols: dict[str, list[np.ndarray]] = {}
        for shard, row in self.shards.items():
            columns = self._table_columns(shard, row, name)
            if columns is None:
                continue
            if cols and sorted(columns) != sorted(cols):
                missing = sorted(set(cols) ^ set(columns))
                raise StoreDamaged(self.path, shard, name, "", f"columns {missing} missing here or elsewhere")
            for k, listed in columns.items():
                arr = CheckedArray(self.path, shard, f"{name}/{k}", listed, sparse=listed is None)
                cols.setdefault(k, []).append(arr[...])
        return {k: np.concatenate(v) for k, v in cols.items()}

    def _table_columns(self, shard: str, row: dict, name: str) -> dict[str, frozenset[str] | None] | None:
        """Side table ``name`` of one shard: column -> the chunk files its marker lists (None for layout 1,
        whose columns are the folders present); None when the shard has no such table."""
        d = shard_dir(self.path, shard) / name
        if row["layout"] == 1:
            return {p.name: None for p in sorted(d.iterdir()) if p.is_dir()} if d.is_dir() else None
        if name not in (row.get("groups") or []):
            return None
        try:
            files = read_marker(self.path, shard)["files"]
        except (ValueError, KeyError) as e:
            raise StoreDamaged(self.path, shard, name, "", f"marker unreadable: {e}") from None
        parts = [f.split("/", 2) for f in files if f.startswith(f"{name}/") and f.count("/") >= 2]
        return {k: frozenset(rest for t, kk, rest in parts if kk == k and rest != "zarr.json")
                for k in sorted({kk for _, kk, rest in parts if rest == "zarr.json"})}

    def errors(self) -> list[dict]:
        """Per-sample errors of committed shards (read from the markers of shards that have some)."""
        return shard_errors(self.path, self.index)

    def n_tokens(self) -> dict[str, int]:
        return {m: sum(r["tokens"][m] for r in self.shards.values()) for m in MODALITIES}

    def summary(self) -> dict[str, Any]:
        """Counts from the index (``index.summarize``): no file of a shard is opened or stat'ed."""
        return summarize(self.path, self.attrs, self.index)

    def _check_modality(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise StoreError(f"unknown modality {modality!r} (choose from {', '.join(MODALITIES)})")


def _import_xarray():
    try:
        import xarray
    except ImportError as err:  # optional dependency
        raise ImportError("KeyStore.to_xarray needs xarray: pip install 'kscale[analysis]' (or pip install "
                          "xarray)") from err
    return xarray


def open_store(path: str | Path) -> KeyStore:
    """Open a kscale key store for reading (committed shards only, from the index)."""
    p = Path(path).expanduser()
    attrs = read_root_attrs(p)
    return KeyStore(str(p), attrs, load_index(p))
