"""Read a key store: lazy dask arrays of keys, the token table, errors and a summary.

Only committed shards are visible. ``keys(layer, modality)`` concatenates the shards' arrays for that
layer in shard order, and ``tokens(modality)`` returns the token table in the same order, so row i of
one is row i of the other. ``layer`` is the model's layer index, not a position in the stored list.
Post-RoPE keys (``rope=True``) and stored queries come from :mod:`kscale.store.rope` and
:mod:`kscale.store.queries`, imported when asked (they need torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from kscale.errors import KscaleError
from kscale.store.layout import MODALITIES, TABLE_COLUMNS, committed_shards, is_store, shard_dir


class StoreError(KscaleError, ValueError):
    pass


@dataclass
class KeyStore:
    path: str
    attrs: dict[str, Any]
    shards: dict[str, dict]  # committed shard name -> marker

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
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES

    def _group(self, shard: str, modality: str) -> zarr.Group | None:
        d = shard_dir(self.path, shard) / modality
        return zarr.open_group(str(d), mode="r") if d.is_dir() else None

    def _layer_pos(self, layer: int) -> int:
        if layer not in self.layers:
            raise StoreError(f"layer {layer} is not in store {self.path} (layers: {self.layers})")
        return self.layers.index(layer)

    def keys(self, layer: int, modality: str, heads: list[int] | None = None, rope: bool = False) -> da.Array:
        """(N, H, D) keys of one layer and modality, lazily, over all committed shards.

        Stored keys are pre-RoPE; ``rope=True`` rebuilds the post-RoPE keys the model attended with, from
        the stored positions and the model's own rotary embedding (built from its config.json).
        """
        self._check_modality(modality)
        li = self._layer_pos(layer)
        parts = []
        for name in self.shards:
            g = self._group(name, modality)
            if g is None:
                continue
            arr = g["keys"]
            parts.append(da.from_zarr(arr, chunks=arr.chunks)[li])
        H, D = len(self.heads), self.head_dim
        out = da.concatenate(parts, axis=0) if parts else da.zeros((0, H, D), dtype=self.attrs["key_dtype"])
        if heads is not None:
            missing = [h for h in heads if h not in self.heads]
            if missing:
                raise StoreError(f"KV heads {missing} are not in store {self.path} (heads: {self.heads})")
            out = out[:, [self.heads.index(h) for h in heads]]
        if rope:
            from kscale.store.rope import rope_lazy, store_rotary

            out = rope_lazy(out, self.tokens(modality)["rope_pos"], store_rotary(self))
        return out

    def queries(self, layer: int, modality: str, rope: bool = False) -> da.Array:
        """Stored query vectors (``extract.attention.store_queries``), laid out like ``keys``."""
        from kscale.store.queries import read_queries

        return read_queries(self, layer, modality, rope)

    def tokens(self, modality: str) -> dict[str, np.ndarray]:
        """Token table of one modality, rows aligned with ``keys(layer, modality)``."""
        self._check_modality(modality)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in TABLE_COLUMNS}
        for name in self.shards:
            g = self._group(name, modality)
            if g is None:
                continue
            for k in TABLE_COLUMNS:
                cols[k].append(g[k][:])
        R = int(self.attrs["rope_rows"])
        return {k: (np.concatenate(v) if v else np.zeros((0, R) if k == "rope_pos" else (0,), dtype=TABLE_COLUMNS[k]))
                for k, v in cols.items()}

    def token_column(self, modality: str, name: str) -> da.Array:
        """One token-table column, lazily: rows aligned with ``keys(layer, modality)`` and chunked like its
        token axis, so a block of keys and its block of (say) sample ids come from the same rows. Streaming
        consumers (the analysis) read it block by block instead of loading ``tokens()`` whole."""
        self._check_modality(modality)
        if name not in TABLE_COLUMNS:
            raise StoreError(f"unknown token column {name!r} (columns: {', '.join(TABLE_COLUMNS)})")
        parts = []
        for shard in self.shards:
            g = self._group(shard, modality)
            if g is None:
                continue
            col = g[name]
            parts.append(da.from_zarr(col, chunks=(g["keys"].chunks[1], *col.shape[1:])))
        if parts:
            return da.concatenate(parts, axis=0)
        tail = (int(self.attrs["rope_rows"]),) if name == "rope_pos" else ()
        return da.zeros((0, *tail), dtype=TABLE_COLUMNS[name])

    def table(self, name: str) -> dict[str, np.ndarray]:
        """A per-shard side table (e.g. "attention") concatenated over committed shards."""
        cols: dict[str, list[np.ndarray]] = {}
        for shard in self.shards:
            d = shard_dir(self.path, shard) / name
            if not d.is_dir():
                continue
            g = zarr.open_group(str(d), mode="r")
            for k, arr in g.arrays():
                cols.setdefault(k, []).append(arr[:])
        return {k: np.concatenate(v) for k, v in cols.items()}

    def errors(self) -> list[dict]:
        return [e for m in self.shards.values() for e in m.get("errors", [])]

    def n_tokens(self) -> dict[str, int]:
        out = {m: 0 for m in MODALITIES}
        for m in self.shards.values():
            for k, v in m.get("tokens", {}).items():
                out[k] += v
        return out

    def summary(self) -> dict[str, Any]:
        plan = self.attrs.get("plan", {})
        return {
            "path": self.path,
            "model": self.attrs.get("model", {}).get("path"),
            "family": self.attrs.get("model", {}).get("family"),
            "shards_committed": len(self.shards),
            "shards_planned": plan.get("n_shards"),
            "samples": sum(m.get("n_samples_ok", 0) for m in self.shards.values()),
            "errors": len(self.errors()),
            "tokens": self.n_tokens(),
            "layers": self.layers,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "key_dtype": self.attrs.get("key_dtype"),
            "key_bytes": sum(m.get("key_bytes", 0) for m in self.shards.values()),
            "disk_bytes": sum(p.stat().st_size for p in Path(self.path).rglob("*") if p.is_file()),
        }

    def _check_modality(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise StoreError(f"unknown modality {modality!r} (choose from {', '.join(MODALITIES)})")


def open_store(path: str | Path) -> KeyStore:
    """Open a kscale key store for reading (committed shards only)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StoreError(f"no store at {str(p)!r}")
    if not is_store(p):
        raise StoreError(f"{str(p)!r} is not a kscale key store (no zarr.json with format kscale-keys)")
    attrs = dict(zarr.open_group(str(p), mode="r").attrs)
    return KeyStore(str(p), attrs, committed_shards(p))
