"""Vectors of any kind — queries, keys, values — read from a store (``extract.vectors``).

Queries and values are written by the shard's ``ShardWriter`` beside keys, with the *same rows* (same token
sampling, same order), so ``store.tokens(modality)`` describes every kind (``layout.vector_array``)::

    shards/sNNNNNN/<modality>/keys              (layer, token, kv_head, head_dim)   keys (always)
    shards/sNNNNNN/queries/<modality>/queries   (layer, token, q_head, head_dim)    with q
    shards/sNNNNNN/values/<modality>/values     (layer, token, kv_head, head_dim)   with v

each in Zarr shards of (L, chunk_tokens, H, D) with inner chunks (1, chunk_tokens, H, D) and crc32c.
Stored vectors are the projections' outputs as the model uses them before RoPE (bias included; after
``q_norm``/``k_norm`` in families that normalise, see ``kscale.models``): the query heads stored are those
reading the kept KV heads (``q_head = kv_head * G + g``), values are per kept KV head and carry no RoPE.
``read_vectors(..., rope=True)`` rotates q or k with the stored positions, as
:func:`kscale.store.rope.rope_keys` does for keys. Stores written with ``extract.attention.store_queries``
(before ``extract.vectors``) hold q in the same place and read the same.

:class:`VectorView` makes a store of one kind look like a store of keys (``keys``, ``keys_rows``,
``keys_at``, ``heads``): ``analyze.vector: q|v`` runs the unchanged analysis on it.

Legend: L stored layers, N tokens, H heads of the kind, D head dim, G query heads per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from kscale.store.layout import VECTOR_GROUPS, VECTOR_KINDS, keys_chunk_file, shard_dir, vector_array
from kscale.store.reader import (CheckedArray, KeysSel, KeyStore, Span, StoreError, _pieces, _read_v1, coarse_read,
                                 read_block)

DIMS = ["layer", "token", "q_head", "head_dim"]  # of stored queries (``layout.VECTOR_DIMS["q"]``)


def query_heads(kv_heads: list[int], num_heads: int, num_kv_heads: int) -> list[int]:
    """The query heads stored for ``kv_heads``: those reading them under grouped-query attention."""
    G = num_heads // num_kv_heads
    return [k * G + g for k in kv_heads for g in range(G)]


def stored_heads(store: KeyStore, kind: str) -> list[int]:
    """The model's head ids a store holds for ``kind``: query heads for q, KV heads for k and v."""
    if kind == "q":
        m = store.attrs["model"]
        return query_heads(store.heads, m["num_heads"], m["num_kv_heads"])
    return store.heads


def check_kind(store: KeyStore, kind: str) -> None:
    """``StoreError`` unless the store holds ``kind`` in every committed shard. Stores that list their
    ``vectors`` say it in their root attributes; stores written before (where q was the only other kind,
    ``extract.attention.store_queries``) say it per shard: the marker's groups (layout 2) or the folder (1)."""
    if kind not in VECTOR_KINDS:
        raise StoreError(f"unknown vector kind {kind!r} (choose from {', '.join(VECTOR_KINDS)})")
    if kind == "k":
        return
    listed = "vectors" in store.attrs
    if (listed and kind not in store.attrs["vectors"]) or (not listed and kind != "q"):
        raise StoreError(f"store {store.path} holds no {kind} vectors (it holds {', '.join(store.vector_kinds)}; "
                         f"extract with extract.vectors including {kind})")
    g = VECTOR_GROUPS[kind]
    for r in store.shards.values():
        held = (g in (r.get("groups") or []) if r["layout"] != 1
                else (shard_dir(store.path, r["name"]) / g).is_dir())
        if not held:
            raise StoreError(f"shard {r['name']} of {store.path} has no stored {g}"
                             + ("" if listed else " (extract.attention.store_queries was off)"))


def _head_positions(store: KeyStore, kind: str, heads: list[int] | None) -> tuple[int, ...] | None:
    if heads is None:
        return None
    have = stored_heads(store, kind)
    missing = [h for h in heads if h not in have]
    if missing:
        what = "query heads" if kind == "q" else "KV heads"
        raise StoreError(f"{what} {missing} are not in store {store.path} ({what}: {have})")
    return tuple(have.index(h) for h in heads)


@dataclass(frozen=True)
class VectorSel(KeysSel):
    """A coarse read of q or v rows (``KeysSel`` reads keys): the same pieces from the kind's array."""

    kind: str = "q"

    def read(self, store: str, modality: str, s: Span) -> list[np.ndarray]:
        L, H, D = self.shape_LHD
        hs = slice(None) if self.heads is None else list(self.heads)
        array = vector_array(self.kind, modality)
        if s.layout == 1:
            return [_read_v1(store, s.shard, array, (self.layer_pos, slice(s.a, s.b), hs), self.dtype)]
        return [read_block(store, s.shard, array, keys_chunk_file(i), (L, s.n, H, D),
                           (self.layer_pos, slice(a, b), hs), self.dtype) for i, a, b in _pieces(s)]


def vector_sel(store: KeyStore, kind: str, layer: int, heads: list[int] | None) -> KeysSel:
    """What a coarse read of ``kind`` rows of one layer takes from each span."""
    if kind == "k":
        return store._keys_sel(layer, heads)
    check_kind(store, kind)
    li = store._layer_pos(layer)
    return VectorSel(li, (len(store.layers), len(stored_heads(store, kind)), store.head_dim),
                     _head_positions(store, kind, heads), store.attrs["key_dtype"], kind)


def read_vectors(store: KeyStore, kind: str, layer: int, modality: str, heads: list[int] | None = None,
                 rope: bool = False, rotary: Any = None) -> da.Array:
    """(N, H, D) stored ``kind`` vectors of one layer and modality over committed shards, rows aligned with
    ``store.tokens(modality)``; q and k post-RoPE (float32) with ``rope=True``. ``heads``: the model's query
    heads for q, KV heads for k and v (None: all stored). Layout-2 shards: built from the index like
    ``keys`` (damage named by ``StoreDamaged``); layout-1 shards: through their Zarr metadata."""
    if kind == "k" and rotary is None:
        return store.keys(layer, modality, heads, rope)
    if kind == "v" and rope:
        raise StoreError("values carry no RoPE: read them with rope=False")
    store._check_modality(modality)
    sel = vector_sel(store, kind, layer, heads)
    li, hsel = sel.layer_pos, sel.heads
    L, H, D = sel.shape_LHD
    array = vector_array(kind, modality) if kind != "k" else f"{modality}/keys"
    parts = []
    for layout, rows in store._runs(modality):
        if layout == 1:
            for r in rows:
                p = CheckedArray(store.path, r["name"], array).lazy()[li]
                parts.append(p if hsel is None else p[:, list(hsel)])
            continue

        def blk(i, a, b, n):
            return array, keys_chunk_file(i), (L, n, H, D), (li, slice(a, b), slice(None) if hsel is None else list(hsel))
        parts.append(store._direct(f"vectors-{kind}", rows, modality, (H if hsel is None else len(hsel), D),
                                   sel.dtype, blk, (li, hsel)))
    Hs = H if hsel is None else len(hsel)
    out = da.concatenate(parts, axis=0) if parts else da.zeros((0, Hs, D), dtype=sel.dtype)
    if rope:
        from kscale.models.rope import rotary_for_layer
        from kscale.store.rope import rope_lazy, store_rotary

        out = rope_lazy(out, store.token_column(modality, "rope_pos"),
                        rotary_for_layer(rotary if rotary is not None else store_rotary(store), layer))
    return out


def read_queries(store: KeyStore, layer: int, modality: str, rope: bool = False, rotary: Any = None) -> da.Array:
    """Stored queries of every stored query head: ``read_vectors(store, "q", ...)``."""
    return read_vectors(store, "q", layer, modality, None, rope, rotary)


class VectorView:
    """A store seen through one kind: ``keys``, ``keys_rows``, ``keys_at``, ``heads`` and the key dtype answer
    for q or v; everything else (token columns, index, attributes) is the store's. What ``analyze.vector``
    hands the analysis, which reads only that interface."""

    def __init__(self, store: KeyStore, kind: str):
        check_kind(store, kind)
        self.store, self.kind = store, kind
        self.heads = stored_heads(store, kind)

    def __getattr__(self, name: str) -> Any:  # token columns, index, attrs, layers, head_dim: the store's
        return getattr(self.store, name)

    def keys(self, layer: int, modality: str, heads: list[int] | None = None, rope: bool = False) -> da.Array:
        return read_vectors(self.store, self.kind, layer, modality, heads, rope)

    def keys_rows(self, layer: int, modality: str, lo: int, hi: int, heads: list[int] | None = None) -> Any:
        what = vector_sel(self.store, self.kind, layer, heads)
        return coarse_read(self.store.path, modality, self.store.spans(modality, lo, hi), what)

    def keys_at(self, layer: int, modality: str, index: np.ndarray, heads: list[int] | None = None) -> np.ndarray:
        return self.store._gather(modality, vector_sel(self.store, self.kind, layer, heads), index)


def vector_view(store: Any, kind: str) -> Any:
    """``store`` itself for keys, else a :class:`VectorView` of ``kind`` (q or v)."""
    return store if kind == "k" else VectorView(store, kind)
