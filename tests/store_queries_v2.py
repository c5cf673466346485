"""The query writer of stores written before ``extract.vectors`` (``extract.attention.store_queries`` then had
its own writer, zarr-python writing ``queries/<modality>/queries`` into the shard's staging folder), kept
here to write such stores in tests: they stay readable (``KeyStore.queries`` / ``vectors("q", ...)``).

Legend: L layers, N kept tokens, H query heads kept, D head dim, B batch, T tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from kscale.models import MODALITY_CODES
from kscale.store.layout import FLAT_CHUNKS

DIMS = ["layer", "token", "q_head", "head_dim"]


class QueryWriter:
    """Buffered whole-chunk writer of one shard's query arrays, into the staging folder of the shard's
    ``ShardWriter`` (create it after that writer, in the same process; the writer's commit publishes both).
    Sharded like keys: one file per ``chunk_tokens`` rows holding every layer, crc32c on every chunk."""

    def __init__(self, store: str | Path, shard_name: str, *, dtype: str, chunk_tokens: int):
        folder, = (p for p in Path(store, "shards").glob(f".{shard_name}.tmp-*-{os.getpid()}-*") if p.is_dir())
        self.root = zarr.open_group(str(folder / "queries"), mode="w")  # the staging folder of this process's writer
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
