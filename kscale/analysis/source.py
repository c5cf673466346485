"""Where the analysis meets the key store: sample buckets, sample-aligned joint blocks and subsamples.

The driver never holds every token's sample id. Every **joint block** holds whole samples, with the
rows of every modality of those samples (samples' rows are contiguous and sorted by sample id in the
store), so per-sample feature sums, and the sample-block estimators of ``mmd.py``, are complete inside
one block; workers read a block's keys together with its sample ids. On a key store (``kscale.store``,
:class:`RangeStore`) blocks are planned from the store index (:func:`index_block_plan`: runs of whole
shards) and each block is one coarse read per modality of its keys and of its ids
(:class:`RangeItems`), so tasks follow blocks, not shards. Any other reader (lazy dask arrays
``keys(layer, modality, heads)`` (N, H, d) and ``token_column(modality, "sample_id")``, e.g. the test
fakes) gets :func:`block_plan`, which streams the id columns one chunk at a time and keeps only where
to cut, and :func:`joint_items`, which rechunks the arrays into the blocks.

Every sample maps to one of K buckets by a seeded hash of its id (:class:`Buckets`): the clusters of
every SE, the halves of the intra-modal baselines and of cross-MMD, the held-out set of the probes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dask
import dask.array as da
import numpy as np


class KeyStoreLike(Protocol):
    layers: list[int]
    heads: list[int]
    head_dim: int
    attrs: dict
    path: str

    def keys(self, layer: int, modality: str, heads: list[int] | None = None) -> da.Array: ...

    def token_column(self, modality: str, name: str) -> da.Array: ...


def open_store(path: str) -> KeyStoreLike:
    import kscale.store

    return kscale.store.open(path)


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-mixing bijection of uint64 (same on every machine)."""
    z = np.asarray(z, np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class TableBuckets:
    """Buckets from an explicit table (sorted ids -> bucket): for tests and benchmarks on plain arrays."""

    ids: np.ndarray
    bucket_of: np.ndarray
    n_buckets: int

    def of(self, sample_ids: np.ndarray) -> np.ndarray:
        return self.bucket_of[np.searchsorted(self.ids, sample_ids)]


@dataclass(frozen=True)
class Buckets:
    """Sample id -> bucket in [0, K): ``mix64(id ^ mix64(seed))`` mod K. A pure function of the id and
    the seed, so every worker assigns buckets alone, whatever the order it sees samples in."""

    n_buckets: int
    seed: int

    def of(self, sample_ids: np.ndarray) -> np.ndarray:
        salt = mix64(np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0xB0C))
        ids = np.asarray(sample_ids).astype(np.int64).view(np.uint64)
        return (mix64(ids ^ salt) % np.uint64(self.n_buckets)).astype(np.int64)


# --- sample-aligned joint blocks ----------------------------------------------------------------------

def _runs(ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample id, rows) of each run of equal ids."""
    if len(ids_N) == 0:
        return ids_N[:0], np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, ids_N[1:] != ids_N[:-1]])
    return ids_N[starts], np.diff(np.r_[starts, len(ids_N)])


def _column_blocks(col: da.Array) -> Iterator[np.ndarray]:
    for blk in col.to_delayed().ravel():
        yield np.asarray(dask.compute(blk, scheduler="sync")[0])


def _sample_stream(blocks: Iterable[np.ndarray], mod: str, where: str) -> Iterator[tuple[int, int, str]]:
    """(sample id, rows, modality) per sample, from the id column's blocks in row order."""
    last, pending = None, 0
    for ids_N in blocks:
        run_ids, run_rows = _runs(ids_N)
        for sid, n in zip(run_ids.tolist(), run_rows.tolist()):
            if sid == last:
                pending += n
                continue
            if last is not None:
                if sid < last:
                    raise ValueError(f"{where}: {mod} token table is not sorted by sample id "
                                     f"(sample {sid} after {last}); the analysis needs each sample's rows "
                                     "contiguous and samples in increasing id order, as the writer stores them")
                yield last, pending, mod
            last, pending = sid, n
    if last is not None:
        yield last, pending, mod


@dataclass(frozen=True)
class BlockPlan:
    """Rows of each modality in each joint block (a block holds whole samples of every modality)."""

    rows: dict[str, tuple[int, ...]]

    @property
    def n_blocks(self) -> int:
        return len(next(iter(self.rows.values())))


def block_plan(id_cols: dict[str, da.Array], max_rows: int, max_samples: int, where: str) -> BlockPlan:
    """Cut the stores' samples, in id order, into blocks of at most ``max_rows`` rows over all modalities
    and ``max_samples`` samples (a single larger sample gets a block of its own). Streams the id
    columns; memory is O(blocks), never O(tokens)."""
    mods = list(id_cols)
    merged = heapq.merge(*(_sample_stream(_column_blocks(col), m, where) for m, col in id_cols.items()))
    rows: dict[str, list[int]] = {m: [] for m in mods}
    cur = {m: 0 for m in mods}
    cur_samples, cur_id = 0, None
    for sid, n, mod in merged:
        if sid != cur_id:
            if cur_samples and (sum(cur.values()) + n > max_rows or cur_samples >= max_samples):
                for m in mods:
                    rows[m].append(cur[m])
                    cur[m] = 0
                cur_samples = 0
            cur_id, cur_samples = sid, cur_samples + 1
        cur[mod] += n
    if cur_samples:
        for m in mods:
            rows[m].append(cur[m])
    return BlockPlan({m: tuple(r) for m, r in rows.items()})


class RangeStore(KeyStoreLike, Protocol):
    """A store with an index (``kscale.store.KeyStore``): coarse reads of row ranges over runs of shards."""

    @property
    def shards(self) -> dict[str, dict]: ...

    def n_tokens(self) -> dict[str, int]: ...

    def keys_rows(self, layer: int, modality: str, lo: int, hi: int, heads: list[int] | None = None) -> Any: ...

    def column_rows(self, modality: str, name: str, lo: int, hi: int) -> Any: ...

    def keys_at(self, layer: int, modality: str, index: np.ndarray, heads: list[int] | None = None,
                ) -> np.ndarray: ...

    def column_at(self, modality: str, name: str, index: np.ndarray) -> np.ndarray: ...


def has_index(ks: KeyStoreLike) -> bool:
    """Whether ``ks`` reads row ranges in coarse tasks (a real store) or only gives dask arrays (fakes)."""
    return all(hasattr(ks, a) for a in ("shards", "n_tokens", "keys_rows", "column_rows", "keys_at", "column_at"))


def _shard_units(ks: RangeStore, mods: list[str], max_rows: int, max_samples: int, where: str,
                 ) -> Iterator[tuple[dict[str, int], int]]:
    """(rows per modality, samples) of consecutive units of whole samples, from the index: a shard that
    fits a block is one unit (its samples are whole: a shard is a sample range); a larger one is cut
    into its samples from its sample ids (one coarse read per modality, in the driver)."""
    at, prev_stop = dict.fromkeys(mods, 0), None
    for r in ks.shards.values():
        n = {m: int(r["tokens"][m]) for m in mods}
        if r.get("start") is not None:
            if prev_stop is not None and r["start"] < prev_stop:
                raise ValueError(f"{where}: shard {r['name']} starts at sample {r['start']} before the previous "
                                 f"shard's end {prev_stop}; the analysis needs shards in increasing sample order")
            prev_stop = r["stop"]
        if sum(n.values()) == 0:
            continue
        if 0 < r["n_samples_ok"] <= max_samples and sum(n.values()) <= max_rows:
            yield n, r["n_samples_ok"]
        else:
            ids = {m: np.asarray(dask.compute(ks.column_rows(m, "sample_id", at[m], at[m] + n[m]),
                                              scheduler="sync")[0]) for m in mods if n[m]}
            merged = heapq.merge(*(_sample_stream([v], m, where) for m, v in ids.items()))
            unit, sid = None, None
            for s, rows, mod in merged:
                if s != sid:
                    if unit is not None:
                        yield unit, 1
                    unit, sid = dict.fromkeys(mods, 0), s
                unit[mod] += rows
            if unit is not None:
                yield unit, 1
        for m in mods:
            at[m] += n[m]


def index_block_plan(ks: RangeStore, mods: list[str], max_rows: int, max_samples: int, where: str,
                     ) -> BlockPlan:
    """:func:`block_plan` for a store with an index: blocks of whole shards (runs of consecutive shards
    up to ``max_rows`` rows and ``max_samples`` samples), cut inside a shard only where the shard alone
    exceeds them. Memory is O(blocks); for stores of shards smaller than a block no id is read."""
    rows: dict[str, list[int]] = {m: [] for m in mods}
    cur, cur_samples = dict.fromkeys(mods, 0), 0
    for n, samples in _shard_units(ks, mods, max_rows, max_samples, where):
        if cur_samples and (sum(cur.values()) + sum(n.values()) > max_rows or cur_samples + samples > max_samples):
            for m in mods:
                rows[m].append(cur[m])
                cur[m] = 0
            cur_samples = 0
        cur_samples += samples
        for m in mods:
            cur[m] += n[m]
    if cur_samples:
        for m in mods:
            rows[m].append(cur[m])
    return BlockPlan({m: tuple(r) for m, r in rows.items()})


class RangeItems(Sequence):
    """:func:`joint_items` for a store with an index, built on demand: item i maps modality -> (ONE
    delayed read of block i's keys rows, one of its sample ids) (``keys_rows`` / ``column_rows``, each
    over a run of shards) or None. A sequence, not a list: a block's delayed reads take ~8 KB, and a
    10⁹-token store has up to ~10⁵ blocks per pass, so the driver holds only the block offsets."""

    def __init__(self, ks: RangeStore, layer: int, heads: list[int], plan: BlockPlan):
        self.ks, self.layer, self.heads = ks, layer, heads
        self.starts = {m: np.concatenate([[0], np.cumsum(r, dtype=np.int64)]) for m, r in plan.rows.items()}

    def __len__(self) -> int:
        return len(next(iter(self.starts.values()))) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        item: dict[str, tuple[Any, Any] | None] = {}
        for m, at in self.starts.items():
            lo, hi = int(at[i]), int(at[i + 1])
            item[m] = (self.ks.keys_rows(self.layer, m, lo, hi, self.heads),
                       self.ks.column_rows(m, "sample_id", lo, hi)) if hi > lo else None
        return item


def range_items(ks: RangeStore, layer: int, heads: list[int], plan: BlockPlan) -> RangeItems:
    return RangeItems(ks, layer, heads, plan)


def _delayed_parts(x: da.Array, sizes: tuple[int, ...]) -> list[Any]:
    """Delayed pieces of ``x`` (rows along axis 0) of the given sizes; None where a size is 0."""
    nonzero = tuple(s for s in sizes if s > 0)
    if not nonzero:
        return [None] * len(sizes)
    y = x.rechunk({0: nonzero, **{a: -1 for a in range(1, x.ndim)}})
    it = iter(y.to_delayed().ravel())
    return [next(it) if s > 0 else None for s in sizes]


def joint_items(keys: dict[str, da.Array], ids: dict[str, da.Array], plan: BlockPlan,
                ) -> list[dict[str, tuple[Any, Any] | None]]:
    """One item per joint block: modality -> (delayed keys (n, H, d), delayed sample ids (n,)) or None."""
    parts = {m: list(zip(_delayed_parts(keys[m], plan.rows[m]), _delayed_parts(ids[m], plan.rows[m])))
             for m in keys}
    return [{m: (p[i] if p[i][0] is not None else None) for m, p in parts.items()}
            for i in range(plan.n_blocks)]


def rows_per_block(chunk_mb: int, row_bytes: int) -> int:
    return max(1, int(chunk_mb * 2**20 // max(row_bytes, 1)))


# --- subsamples ---------------------------------------------------------------------------------------

def subsample_index(n: int, k: int, seed: int) -> np.ndarray:
    """k of n token indices in random order (seeded); all of them when k >= n."""
    rng = np.random.default_rng([seed, 0x5B5])
    return rng.permutation(n)[: min(k, n)]


def read_rows(x: da.Array, index: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Rows ``x[index]`` (in the order of ``index``), read with one sorted fancy index."""
    order = np.argsort(index)
    rows = np.asarray(x[np.sort(index)].compute(), dtype=dtype)
    out = np.empty_like(rows)
    out[order] = rows
    return out
