"""Query vectors stored like keys (``extract.attention.store_queries``), for offline attention analysis.

Layout, beside the shard's key groups and with the *same rows* (same token sampling, same order), so
``store.tokens(modality)`` describes them too::

    shards/sNNNNNN/queries/<modality>/queries   (layer, token, q_head, head_dim), inner chunks (1, chunk_tokens, Hq, D)
                                                in Zarr shards of (L, chunk_tokens, Hq, D), crc32c

Stored queries are pre-RoPE ``q_proj`` outputs (bias included) of the query heads that read the kept KV
heads (``q_head = kv_head * G + g``); ``read_queries(..., rope=True)`` rotates them with the stored
positions, exactly as :func:`kscale.store.rope.rope_keys` does for keys. A ``QueryWriter`` owns its folder
inside the shard and writes whole chunks only; the extraction worker stacks the captured ``q_proj`` outputs
(``kscale.extract.worker.stacked_queries``), hands them over per batch, and closes the writer before the
shard's commit marker is written. ``KeyStore.queries`` reads them back through :func:`read_queries`.

Legend: L hooked layers, B batch, T tokens, N kept tokens, H query heads kept, D head dim.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from kscale.models import MODALITY_CODES
from kscale.store.layout import FLAT_CHUNKS, MODALITIES, keys_chunk_file, shard_dir, staging_dir
from kscale.store.reader import CheckedArray, KeyStore, StoreError

DIMS = ["layer", "token", "q_head", "head_dim"]


def query_heads(kv_heads: list[int], num_heads: int, num_kv_heads: int) -> list[int]:
    """The query heads stored for ``kv_heads``: those reading them under grouped-query attention."""
    G = num_heads // num_kv_heads
    return [k * G + g for k in kv_heads for g in range(G)]


class QueryWriter:
    """Buffered whole-chunk writer of one shard's query arrays, into the staging folder of the shard's
    ``ShardWriter`` (create it after that writer, in the same process; the writer's commit publishes both).
    Sharded like keys: one file per ``chunk_tokens`` rows holding every layer, crc32c on every chunk."""

    def __init__(self, store: str | Path, shard_name: str, *, dtype: str, chunk_tokens: int):
        self.root = zarr.open_group(str(staging_dir(store, shard_name) / "queries"), mode="w")
        self.dtype, self.chunk = dtype, chunk_tokens
        self.pending: dict[str, list[np.ndarray]] = {}
        self.arrays: dict[str, zarr.Array] = {}

    def append(self, modality: str, queries_LNHD: np.ndarray) -> None:
        if queries_LNHD.shape[1] == 0:
            return
        self.pending.setdefault(modality, []).append(queries_LNHD.astype(self.dtype))
        if sum(p.shape[1] for p in self.pending[modality]) >= self.chunk:
            self._flush(modality, final=False)

    def _flush(self, modality: str, final: bool) -> None:
        if not self.pending.get(modality):
            return
        q = np.concatenate(self.pending[modality], axis=1)
        n = q.shape[1] if final else (q.shape[1] // self.chunk) * self.chunk
        arr = self.arrays.get(modality)
        if arr is None:
            L, _, H, D = q.shape
            c = min(self.chunk, n)  # a modality with fewer rows than a chunk: one unpadded chunk (as keys)
            arr = self.arrays[modality] = self.root.require_group(modality).create_array(
                "queries", shape=(L, 0, H, D), chunks=(1, c, H, D), shards=(L, c, H, D),
                dtype=self.dtype, dimension_names=DIMS, compressors=[Crc32cCodec()], **FLAT_CHUNKS)
        a = arr.shape[1]
        arr.resize((arr.shape[0], a + n, *arr.shape[2:]))
        arr[:, a:a + n] = q[:, :n]
        self.pending[modality] = [q[:, n:]] if n < q.shape[1] else []

    def append_batch(self, q_LBTHD: torch.Tensor, modality_BT: torch.Tensor, keep_BT: torch.Tensor) -> None:
        """Queries of one batch's kept tokens, split by modality tag; ``keep_BT`` must be the mask the keys
        were written with (same rows)."""
        for name, code in MODALITY_CODES.items():
            m = keep_BT & (modality_BT == code)
            if m.any():
                self.append(name, q_LBTHD[:, m].numpy())

    def close(self) -> None:
        for modality in list(self.pending):
            self._flush(modality, final=True)


def read_queries(store: KeyStore, layer: int, modality: str, rope: bool = False,
                 rotary: torch.nn.Module | None = None) -> da.Array:
    """(N, H, D) stored queries of one layer and modality over committed shards, rows aligned with
    ``store.tokens(modality)``; post-RoPE (float32) with ``rope=True``. Layout-2 shards: built from the
    index like ``keys`` (damage named by ``StoreDamaged``); layout-1 shards: through their Zarr metadata."""
    if modality not in MODALITIES:
        raise StoreError(f"unknown modality {modality!r} (choose from {', '.join(MODALITIES)})")
    li = store.layers.index(layer) if layer in store.layers else None
    if li is None:
        raise StoreError(f"layer {layer} is not in store {store.path} (layers: {store.layers})")
    parts = []
    for layout, rows in store._runs(modality):
        missing = [r["name"] for r in rows if layout != 1 and "queries" not in (r.get("groups") or [])]
        if missing:
            raise StoreError(f"shard {missing[0]} of {store.path} has no stored queries "
                             "(extract.attention.store_queries was off)")
        if layout != 1:
            m = store.attrs["model"]
            Hq, L, D = len(store.heads) * m["num_heads"] // m["num_kv_heads"], len(store.layers), store.head_dim

            def sel(i, a, b, n):
                return (f"queries/{modality}/queries", keys_chunk_file(i), (L, n, Hq, D), (li, slice(a, b)))
            parts.append(store._direct("queries", rows, modality, (Hq, D), store.attrs["key_dtype"], sel, li))
            continue
        for r in rows:
            d = shard_dir(store.path, r["name"]) / "queries" / modality
            if not (d / "queries").is_dir():
                raise StoreError(f"shard {r['name']} of {store.path} has no stored queries "
                                 "(extract.attention.store_queries was off)")
            parts.append(CheckedArray(store.path, r["name"], f"queries/{modality}/queries").lazy()[li])
    if not parts:
        raise StoreError(f"store {store.path} has no stored {modality} queries")
    out = da.concatenate(parts, axis=0)
    if rope:
        from kscale.models.rope import rotary_for_layer
        from kscale.store.rope import rope_lazy, store_rotary

        out = rope_lazy(out, store.token_column(modality, "rope_pos"),
                        rotary_for_layer(rotary if rotary is not None else store_rotary(store), layer))
    return out
