"""Read a key store: lazy dask arrays of keys and token columns, the token table, errors and a summary.

Only committed shards are visible: ``open_store`` takes them from the store index (``index.py``,
rebuilt from the markers when stale). ``keys(layer, modality)`` concatenates the shards' rows for that
layer in shard order, and ``token_column``/``tokens`` give the token table in the same order, so row i
of one is row i of the other. ``layer`` is the model's layer index, not a position in the stored list.

Layout-2 shards (``layout.py``) become dask graphs built directly from the index rows: one task per
(shard, ``chunk_tokens`` block) that opens and reads its Zarr shard file only when computed, so
building ``keys(layer, modality)`` over 10,000 shards touches no file. A task refuses a missing,
truncated or damaged file with ``StoreDamaged`` (store, shard, array, chunk): the file must exist (a
missing chunk never reads as Zarr's fill value) and every chunk carries a crc32c. Layout-1 shards
(stores written before format 2) are read exactly as before, through their Zarr metadata.
Post-RoPE keys (``rope=True``) and stored queries come from :mod:`kscale.store.rope` and
:mod:`kscale.store.queries`, imported when asked (they need torch).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from kscale.store.index import Index, load_index, shard_errors, summarize
from kscale.store.layout import (MODALITIES, TABLE_COLUMNS, StoreError, field_slice, keys_chunk_file,
                                 read_root_attrs, shard_dir, tokens_chunk_file)


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


def read_block(store: str, shard: str, array: str, file: str, shape: tuple[int, ...], sel: tuple,
               dtype: str) -> np.ndarray:
    """One task of a layout-2 graph: ``STORE/shards/<shard>/<array>[sel]`` read from ``file`` only."""
    path = os.path.join(store, "shards", shard, array)
    if not os.path.isfile(os.path.join(path, file)):
        raise StoreDamaged(store, shard, array, file, "file missing")
    try:
        return np.asarray(_open_array(path, shape)[sel], dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any decode failure is this chunk's damage, named
        raise StoreDamaged(store, shard, array, file, f"{type(e).__name__}: {e}") from None


def _blocks(n: int, c: int) -> list[tuple[int, int, int]]:
    return [(i, i * c, min(n, (i + 1) * c)) for i in range(math.ceil(n / c))]


@dataclass
class KeyStore:
    path: str
    attrs: dict[str, Any]
    index: Index

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

    def _shard_array(self, shard: str, modality: str, array: str) -> zarr.Array:
        return zarr.open_array(str(shard_dir(self.path, shard) / modality / array), mode="r")

    def keys(self, layer: int, modality: str, heads: list[int] | None = None, rope: bool = False) -> da.Array:
        """(N, H, D) keys of one layer and modality, lazily, over all committed shards.

        Stored keys are pre-RoPE; ``rope=True`` rebuilds the post-RoPE keys the model attended with, from
        the stored positions and the model's own rotary embedding (built from its config.json).
        """
        li = self._layer_pos(layer)
        if heads is not None:
            missing = [h for h in heads if h not in self.heads]
            if missing:
                raise StoreError(f"KV heads {missing} are not in store {self.path} (heads: {self.heads})")
        hsel = None if heads is None else tuple(self.heads.index(h) for h in heads)
        H, D, L = len(self.heads), self.head_dim, len(self.layers)
        dtype = self.attrs["key_dtype"]
        parts = []
        for layout, rows in self._runs(modality):
            if layout == 1:
                for r in rows:
                    arr = self._shard_array(r["name"], modality, "keys")
                    p = da.from_zarr(arr, chunks=arr.chunks)[li]
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
            from kscale.store.rope import rope_lazy, store_rotary

            out = rope_lazy(out, self.token_column(modality, "rope_pos"), store_rotary(self))
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

    def queries(self, layer: int, modality: str, rope: bool = False) -> da.Array:
        """Stored query vectors (``extract.attention.store_queries``), laid out like ``keys``."""
        from kscale.store.queries import read_queries

        return read_queries(self, layer, modality, rope)

    def token_column(self, modality: str, name: str) -> da.Array:
        """One token column, lazily: (N,) or (N, R) for ``rope_pos``, chunked like ``keys``' token axis
        (one block per shard and ``chunk_tokens`` rows), rows aligned with ``keys(layer, modality)``."""
        if name not in TABLE_COLUMNS:
            raise StoreError(f"unknown token column {name!r} (choose from {', '.join(TABLE_COLUMNS)})")
        R, dtype = self.rope_rows, TABLE_COLUMNS[name]
        fs = field_slice(name, R)
        parts = []
        for layout, rows in self._runs(modality):
            if layout == 1:
                for r in rows:
                    arr = self._shard_array(r["name"], modality, name)
                    parts.append(da.from_zarr(arr, chunks=arr.chunks))
                continue

            def sel(i, a, b, n):
                return (f"{modality}/tokens", tokens_chunk_file(i), (n, 4 + R),
                        (slice(a, b), fs if name == "rope_pos" else fs.start))
            parts.append(self._direct(f"col-{name}", rows, modality, (R,) if name == "rope_pos" else (), dtype, sel,
                                      name))
        if not parts:
            return da.zeros((0, R) if name == "rope_pos" else (0,), dtype=dtype)
        return da.concatenate(parts, axis=0)

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
            g = zarr.open_group(str(d), mode="r")
            for k in TABLE_COLUMNS:
                cols[k].append(g[k][:])
        R = self.rope_rows
        return {k: (np.concatenate(v) if v else np.zeros((0, R) if k == "rope_pos" else (0,), dtype=TABLE_COLUMNS[k]))
                for k, v in cols.items()}

    def table(self, name: str) -> dict[str, np.ndarray]:
        """A per-shard side table (e.g. "attention") concatenated over committed shards."""
        self._check_valid()
        cols: dict[str, list[np.ndarray]] = {}
        for shard, row in self.shards.items():
            d = shard_dir(self.path, shard) / name
            if row["layout"] == 1 and not d.is_dir():
                continue
            if row["layout"] != 1 and name not in (row.get("groups") or []):
                continue
            try:
                g = zarr.open_group(str(d), mode="r")
                for k, arr in g.arrays():
                    cols.setdefault(k, []).append(arr[:])
            except Exception as e:  # noqa: BLE001 - named: the marker says this table is there
                raise StoreDamaged(self.path, shard, name, "", f"{type(e).__name__}: {e}") from None
        return {k: np.concatenate(v) for k, v in cols.items()}

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
