"""The writer's files are byte for byte what zarr itself writes for the same groups and arrays.

``ShardWriter`` writes every file of a shard's keys with ``kscale.store.chunks``. Each group and array
of a written shard is written again here by zarr (``create_array`` with the arguments the writer gave
zarr before, then zarr's own codec pipeline), and every file (``zarr.json`` and chunks) is compared. Cases: a modality shorter than one chunk (one chunk of
exactly N rows), several appends spanning whole chunks and a padded last chunk, zstd-compressed keys,
float32 keys, and a layer count that is not a power of two (the shard index's chunk order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from zarr.codecs import Crc32cCodec, ZstdCodec

from kscale.store.layout import FLAT_CHUNKS, KEY_DIMS, TOKEN_DIMS, token_fields
from kscale.store.writer import ShardWriter


def write(path: Path, L: int, dtype: str, chunk: int, compress: bool, sizes: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = ShardWriter(path, "s000000", n_layers=L, n_heads=2, head_dim=4, rope_rows=3, key_dtype=dtype,
                    chunk_tokens=chunk, compress_keys=compress)
    keys = []
    for i, n in enumerate(sizes):
        k = rng.standard_normal((L, n, 2, 4)).astype(dtype)
        keys.append(k)
        cols = {"sample_id": np.full(n, i), "position": np.arange(n), "token_id": rng.integers(0, 99, n),
                "image_index": np.full(n, -1), "rope_pos": rng.integers(0, 50, (n, 3))}
        w.append("image", k, cols)
        w.append("text", k[:, :1], {c: v[:1] for c, v in cols.items()})
    w.commit({}, [])
    return {"image/keys": np.concatenate(keys, axis=1), "text/keys": np.concatenate([k[:, :1] for k in keys], 1)}


def zarr_array(path: Path, name: str, data: np.ndarray, c: int, compress: bool) -> None:
    """``data`` written by zarr itself, with the arguments the writer used when zarr wrote its arrays."""
    if name.endswith("keys"):
        L, _, H, D = data.shape
        arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, c, H, D),
                                shards=(L, c, H, D), dimension_names=list(KEY_DIMS),
                                compressors=[ZstdCodec(level=0), Crc32cCodec()] if compress else [Crc32cCodec()],
                                **FLAT_CHUNKS)
    else:
        arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(c, data.shape[1]),
                                dimension_names=list(TOKEN_DIMS), compressors=[ZstdCodec(level=0), Crc32cCodec()],
                                attributes={"fields": list(token_fields(3))}, **FLAT_CHUNKS)
    arr[...] = data


@pytest.mark.parametrize("L,dtype,chunk,compress,sizes", [
    (4, "float16", 64, False, [5, 7]),  # shorter than a chunk: one chunk of 12 rows
    (3, "float16", 4, False, [3, 6, 2, 4]),  # whole chunks while appending, then a padded last chunk
    (5, "float16", 4, True, [9, 2]),  # zstd keys
    (2, "float32", 4, False, [10]),
], ids=["short", "chunks+tail", "zstd", "float32"])
def test_files_equal_zarrs_own(tmp_path, L, dtype, chunk, compress, sizes):
    store = tmp_path / "store"
    written = write(store, L, dtype, chunk, compress, sizes)
    shard = store / "shards" / "s000000"
    zarr.open_group(str(tmp_path / "ref"), mode="w", attributes={"shard": "s000000"})
    for m in ("image", "text"):
        zarr.open_group(str(tmp_path / "ref" / m), mode="w")
    n_files = 0
    for name in ("image/keys", "image/tokens", "text/keys", "text/tokens"):
        ours = zarr.open_array(str(shard / name), mode="r")
        data = ours[...]  # decodes (and checks every crc32c of) our files
        if name in written:
            np.testing.assert_array_equal(data, written[name])
        c = ours.chunks[-3] if name.endswith("keys") else ours.chunks[0]
        assert c == min(chunk, data.shape[-3 if name.endswith("keys") else 0])
        zarr_array(tmp_path / "ref" / name, name, data, c, compress)
    ours = sorted(p.relative_to(shard) for p in shard.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*") if p.is_file())
    for f in ours:
        assert (shard / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
        n_files += 1
    assert n_files >= 9
