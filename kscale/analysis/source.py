"""Where the analysis meets the key store: sample buckets, chunked blocks and subsamples.

The store reader (``kscale.store.open``) hands out lazy dask arrays ``keys(layer, modality, heads)``
of shape (N, H, d) and a token table in the same order. This module cuts them into blocks of about
``chunk_mb`` (each block travels with its slice of sample ids), draws seeded subsamples that are read
into memory, and maps every sample to one of K buckets (the clusters of every SE, the halves of the
intra-modal baselines and of cross-MMD, the held-out set of the probes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import dask.array as da
import numpy as np


class KeyStoreLike(Protocol):
    layers: list[int]
    heads: list[int]
    head_dim: int
    attrs: dict
    path: str

    def keys(self, layer: int, modality: str, heads: list[int] | None = None) -> da.Array: ...

    def tokens(self, modality: str) -> dict[str, np.ndarray]: ...


def open_store(path: str) -> KeyStoreLike:
    import kscale.store

    return kscale.store.open(path)


@dataclass(frozen=True)
class Buckets:
    """Sample id -> bucket, balanced: a seeded permutation of all sample ids dealt round-robin."""

    ids: np.ndarray  # sorted unique sample ids over all modalities
    bucket_of: np.ndarray
    n_buckets: int

    def of(self, sample_ids: np.ndarray) -> np.ndarray:
        return self.bucket_of[np.searchsorted(self.ids, sample_ids)]


def bucket_table(sample_id_arrays: list[np.ndarray], n_buckets: int, seed: int) -> Buckets:
    ids = np.unique(np.concatenate([np.unique(a) for a in sample_id_arrays]))
    order = np.random.default_rng([seed, 0xB0C]).permutation(len(ids))
    bucket_of = np.empty(len(ids), np.int64)
    bucket_of[order] = np.arange(len(ids)) % n_buckets
    return Buckets(ids, bucket_of, n_buckets)


def blocks(x: da.Array, sample_ids: np.ndarray, chunk_mb: int) -> list[tuple[Any, np.ndarray]]:
    """(delayed block (n, H, d), its sample ids) pairs of about ``chunk_mb`` each, in token order."""
    row_bytes = int(np.prod(x.shape[1:])) * x.dtype.itemsize
    rows = max(1, int(chunk_mb * 2**20 // max(row_bytes, 1)))
    if max(x.chunks[0]) > 2 * rows or len(x.chunks[0]) > 1 and np.median(x.chunks[0]) < rows / 4:
        x = x.rechunk({0: rows, 1: -1, 2: -1})
    else:
        x = x.rechunk({1: -1, 2: -1})
    out, lo = [], 0
    for blk, n in zip(x.to_delayed().ravel(), x.chunks[0]):
        out.append((blk, sample_ids[lo:lo + n]))
        lo += n
    return out


def subsample_index(n: int, k: int, seed: int) -> np.ndarray:
    """k of n token indices in random order (seeded); all of them when k >= n."""
    rng = np.random.default_rng([seed, 0x5B5])
    return rng.permutation(n)[: min(k, n)]


def read_rows(x: da.Array, index: np.ndarray) -> np.ndarray:
    """Rows ``x[index]`` (float64, in the order of ``index``), read with one sorted fancy index."""
    order = np.argsort(index)
    rows = np.asarray(x[np.sort(index)].compute(), dtype=np.float64)
    out = np.empty_like(rows)
    out[order] = rows
    return out
