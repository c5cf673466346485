"""The version-1 shard writer, frozen as it was (kscale before store format 2), to generate v1 stores
for the tests that prove v1 stores read exactly as before (and for bench/scale.py's "before" column).

Writes one shard of a key store: buffered appends, whole-chunk writes, a commit marker last.

A ``ShardWriter`` owns ``shards/<name>/`` exclusively. ``append`` buffers token rows per modality and
writes only whole chunks, on one background thread so that writing overlaps the next forward pass;
``commit`` waits for those writes, flushes the tail and then writes the marker, so a shard without its
marker is by construction incomplete and is deleted and redone by the next run. Keys are stored
uncompressed by default (fp16 keys shrink ~8% under zstd, not worth the CPU); tables use zstd.

Legend: L layers, N tokens, H kv heads, D head dim, R rope rows.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

import json
import os

# frozen copies of the v1 layout constants (kscale.store.layout may change; this file must not)
MODALITIES = ("text", "image", "video", "special")
TABLE_COLUMNS = {"sample_id": "int64", "position": "int32", "rope_pos": "int32", "token_id": "int32",
                 "image_index": "int16"}
KEY_DIMS = ("layer", "token", "kv_head", "head_dim")


def shard_dir(store, shard_name: str) -> Path:
    return Path(store) / "shards" / shard_name


def marker_path(store, shard_name: str) -> Path:
    return Path(store) / "shards" / f"{shard_name}.done.json"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# Flat chunk files (no directory per index) and no scan for all-fill chunks: keys are never empty.
_FAST = {"chunk_key_encoding": {"name": "default", "separator": "."}, "config": {"write_empty_chunks": True}}


class _ModalityBuffer:
    """Rows of one modality of one shard. Arrays are created at the first write with their first size
    (a shard smaller than a chunk costs one metadata write per array, no resize)."""

    def __init__(self, group: zarr.Group, modality: str, L: int, H: int, D: int, R: int, key_dtype: str,
                 chunk: int, compress_keys: bool, pool: ThreadPoolExecutor):
        self.g = group.create_group(modality)
        self.chunk, self.n_written, self.pool = chunk, 0, pool
        self.R, self.key_dtype, self.compress_keys = R, key_dtype, compress_keys
        self.writes: list[Future] = []
        self.keys: zarr.Array | None = None
        self.cols: dict[str, zarr.Array] = {}
        self.pending_keys: list[np.ndarray] = []
        self.pending_cols: dict[str, list[np.ndarray]] = {k: [] for k in TABLE_COLUMNS}
        self.n_pending = 0

    def _create(self, keys_LNHD: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        L, N, H, D = keys_LNHD.shape
        self.keys = self.g.create_array(
            "keys", data=keys_LNHD.astype(self.key_dtype, copy=False), chunks=(1, self.chunk, H, D),
            dimension_names=list(KEY_DIMS), compressors="auto" if self.compress_keys else None, **_FAST)
        for name, dt in TABLE_COLUMNS.items():
            chunks, dims = ((self.chunk, self.R), ["token", "rope_row"]) if name == "rope_pos" else (
                (self.chunk,), ["token"])
            self.cols[name] = self.g.create_array(name, data=cols[name].astype(dt, copy=False), chunks=chunks,
                                                  dimension_names=dims, **_FAST)

    def append(self, keys_LNHD: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        self.pending_keys.append(keys_LNHD)
        for k in TABLE_COLUMNS:
            self.pending_cols[k].append(cols[k])
        self.n_pending += keys_LNHD.shape[1]
        if self.n_pending >= self.chunk:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write buffered rows: whole chunks only, unless ``final``."""
        if not self.n_pending:
            return
        keys = np.concatenate(self.pending_keys, axis=1)
        cols = {k: np.concatenate(v, axis=0) for k, v in self.pending_cols.items()}
        n = keys.shape[1] if final else (keys.shape[1] // self.chunk) * self.chunk
        a, b = self.n_written, self.n_written + n
        self.writes.append(self.pool.submit(self._write, a, b, keys[:, :n], {k: v[:n] for k, v in cols.items()}))
        self.n_written = b
        self.pending_keys = [keys[:, n:]] if n < keys.shape[1] else []
        self.pending_cols = {k: ([v[n:]] if n < len(v) else []) for k, v in cols.items()}
        self.n_pending = keys.shape[1] - n

    def _write(self, a: int, b: int, keys_LNHD: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        if self.keys is None:
            self._create(keys_LNHD, cols)
            return
        self.keys.resize((keys_LNHD.shape[0], b, *keys_LNHD.shape[2:]))
        self.keys[:, a:b] = keys_LNHD
        for k, arr in self.cols.items():
            arr.resize((b, *arr.shape[1:]))
            arr[a:b] = cols[k]

    def wait(self) -> None:
        for f in self.writes:
            f.result()  # re-raises a failed write here, before any commit marker
        self.writes.clear()


class ShardWriterV1:
    def __init__(self, store: str | Path, shard_name: str, *, n_layers: int, n_heads: int, head_dim: int,
                 rope_rows: int, key_dtype: str, chunk_tokens: int, compress_keys: bool = False):
        self.store, self.name = Path(store), shard_name
        d = shard_dir(store, shard_name)
        if d.exists():  # a partial shard from an interrupted run
            shutil.rmtree(d)
        self.group = zarr.open_group(str(d), mode="w")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"kscale-write-{shard_name}")
        self.dims = dict(L=n_layers, H=n_heads, D=head_dim, R=rope_rows, key_dtype=key_dtype, chunk=chunk_tokens,
                         compress_keys=compress_keys, pool=self.pool)
        self.buffers: dict[str, _ModalityBuffer] = {}
        self.tables: dict[str, list[dict[str, np.ndarray]]] = {}
        self.bytes_written = 0
        self.tokens = {m: 0 for m in MODALITIES}

    def append(self, modality: str, keys_LNHD: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        if keys_LNHD.shape[1] == 0:
            return
        buf = self.buffers.get(modality)
        if buf is None:
            buf = self.buffers[modality] = _ModalityBuffer(self.group, modality, **self.dims)
        self.tokens[modality] += keys_LNHD.shape[1]
        self.bytes_written += keys_LNHD.nbytes
        buf.append(keys_LNHD, cols)

    def append_table(self, name: str, cols: dict[str, np.ndarray]) -> None:
        """Add rows to a per-shard side table (e.g. per-sample attention statistics), written at commit."""
        if cols and len(next(iter(cols.values()))):
            self.tables.setdefault(name, []).append({k: np.asarray(v) for k, v in cols.items()})

    def _write_tables(self) -> None:
        for name, parts in self.tables.items():
            g = self.group.require_group(name)
            for k in parts[0]:
                v = np.concatenate([p[k] for p in parts])
                g.create_array(k, data=v, chunks=(max(len(v), 1), *v.shape[1:]))

    def commit(self, stats: dict, errors: list[dict]) -> dict:
        try:
            for buf in self.buffers.values():
                buf.flush(final=True)
            for buf in self.buffers.values():
                buf.wait()
            self._write_tables()
        finally:
            self.pool.shutdown(wait=True)
        marker = {**stats, "tokens": self.tokens, "key_bytes": self.bytes_written, "errors": errors}
        write_json_atomic(marker_path(self.store, self.name), marker)
        return marker
