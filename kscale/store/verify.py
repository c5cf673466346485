"""``kscale verify STORE [--repair]``: check every committed shard, and un-commit the damaged ones.

A shard is checked against its own marker (layout 2): the marker must parse; every file it lists must
exist with the recorded size; every ``zarr.json`` must match the crc32c the marker recorded for it
(``meta_crc32c``; markers written before it have none, and ``verify`` says which shards those are) and
open as the group or array it claims to be; each array's shape must match the marker's token counts; and
(unless ``quick``) every chunk is decoded, which checks its crc32c. Shards are checked in parallel threads (the
work is file reads and crc32c, which release the GIL). Layout-1 shards have no sizes or checksums:
only missing chunk files and undecodable chunks are found.

``repair`` moves each damaged shard's marker aside (``sNNNNNN.damaged-<time>.json``), rewrites the
index, and leaves the shard's files for the next extraction run, which deletes and redoes exactly those
shards (a shard without a marker is not committed). Nothing else is touched.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import zarr

from kscale.store.chunks import file_crc32c
from kscale.store.index import build_index, write_index
from kscale.store.layout import (MODALITIES, VECTOR_GROUPS, marker_path, marker_names, read_marker, read_root_attrs,
                                 shard_dir, store_vectors, vector_array)

# Arrays (by name) whose token axis must hold the marker's rows: keys and tokens, and the q/v vectors.
ROW_ARRAYS = ("/keys", "/tokens", *(f"/{g}" for g in VECTOR_GROUPS.values()))


@dataclass(frozen=True)
class Damage:
    """One damaged shard: what is wrong and where (array and chunk file when known)."""
    shard: str
    array: str
    chunk: str
    reason: str

    def line(self) -> str:
        where = "/".join(x for x in (self.shard, self.array) if x) + (f" chunk {self.chunk}" if self.chunk else "")
        return f"{where}: {self.reason}"


def _chunk_name(arr: zarr.Array, ix: tuple[int, ...]) -> str:
    return "c." + ".".join(map(str, ix))


def _where(rel: str) -> tuple[str, str]:
    """(array, file) of a path inside a shard: ``image/keys/c.0.1.0.0`` -> (``image/keys``, ``c.0.1.0.0``)."""
    folder, _, name = rel.rpartition("/")
    return folder, name


def _node_type(path: Path) -> str:
    """``node_type`` of a ``zarr.json`` ("group" or "array"); ValueError when it is not Zarr v3 metadata."""
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable metadata ({type(e).__name__}: {e})") from None
    kind = meta.get("node_type") if isinstance(meta, dict) else None
    if kind not in ("group", "array"):
        raise ValueError(f"metadata with node_type {kind!r}")
    return kind


def _check_metadata(store: Path, shard: str, marker: dict) -> list[Damage]:
    """Each ``zarr.json`` against the crc32c its marker recorded (markers written since metadata checksums)."""
    out = []
    d = shard_dir(store, shard)
    for rel, want in (marker.get("meta_crc32c") or {}).items():
        got = file_crc32c(d / rel)
        if got != want:
            out.append(Damage(shard, *_where(rel), f"crc32c {got}, marker says {want} (metadata damaged)"))
    return out


def _check_arrays(store: Path, shard: str, marker: dict, quick: bool) -> list[Damage]:
    out = []
    d = shard_dir(store, shard)
    metas = sorted(f for f in marker["files"] if f == "zarr.json" or f.endswith("/zarr.json"))
    for meta in metas:
        rel = meta.rsplit("/", 1)[0] if "/" in meta else ""
        try:
            if _node_type(d / meta) == "group":
                continue
            arr = zarr.open_array(str(d / rel), mode="r")
        except Exception as e:  # noqa: BLE001 - metadata that does not open is this array's damage
            out.append(Damage(shard, rel, "zarr.json", f"{type(e).__name__}: {e}"))
            continue
        mod = rel.split("/")[-2] if rel.count("/") else ""
        if rel.endswith(ROW_ARRAYS) and mod in MODALITIES:  # keys, tokens, queries, values: rows of the shard
            want = marker["tokens"].get(mod, 0)
            n = arr.shape[0] if rel.endswith("/tokens") else arr.shape[1]
            if n != want:
                out.append(Damage(shard, rel, "", f"{n} tokens stored, marker says {want}"))
                continue
        if quick:
            continue
        outer = arr.shards or arr.chunks
        grid = [range(math.ceil(s / c)) for s, c in zip(arr.shape, outer)]
        for ix in itertools.product(*grid):
            try:
                arr[tuple(slice(i * c, min(s, (i + 1) * c)) for i, c, s in zip(ix, outer, arr.shape))]
            except Exception as e:  # noqa: BLE001 - any decode failure is this chunk's damage
                out.append(Damage(shard, rel, _chunk_name(arr, ix), f"{type(e).__name__}: {e}"))
                break
    return out


def _check_v1(store: Path, shard: str, marker: dict, quick: bool) -> list[Damage]:
    out = []
    d = shard_dir(store, shard)
    for m in MODALITIES:
        if marker["tokens"].get(m, 0) and not (d / m).is_dir():
            out.append(Damage(shard, m, "", "modality folder missing, marker says "
                                             f"{marker['tokens'][m]} tokens"))
    if out or quick:
        return out
    for m in MODALITIES:
        if not (d / m).is_dir():
            continue
        for name, arr in zarr.open_group(str(d / m), mode="r").arrays():
            grid = [range(math.ceil(s / c)) for s, c in zip(arr.shape, arr.chunks)]
            for ix in itertools.product(*grid):
                f = d / m / name / _chunk_name(arr, ix)
                if not f.is_file():
                    out.append(Damage(shard, f"{m}/{name}", f.name, "chunk file missing (would read as zeros)"))
                    break
    return out


def check_shard(store: str | Path, shard: str, quick: bool = False,
                kinds: tuple[str, ...] | None = None) -> list[Damage]:
    """Every problem of one committed shard (empty when it is sound). ``kinds``: the vectors the store holds
    (``layout.store_vectors``; read from the root when None): each must be listed for every modality."""
    store = Path(store)
    kinds = store_vectors(read_root_attrs(store)) if kinds is None else kinds
    try:
        marker = read_marker(store, shard)
        if not isinstance(marker.get("tokens"), dict):
            raise ValueError("no token counts")
    except ValueError as e:
        return [Damage(shard, "", "", f"marker unreadable: {e}")]
    if marker.get("layout", 1) == 1:
        return _check_v1(store, shard, marker, quick)
    files = marker.get("files")
    if not isinstance(files, dict):
        return [Damage(shard, "", "", "marker lists no files")]
    d = shard_dir(store, shard)
    out = []
    for rel, size in files.items():
        p = d / rel
        try:
            got = os.stat(p).st_size
        except FileNotFoundError:
            out.append(Damage(shard, *_where(rel), "file missing"))
            continue
        if got != size:
            out.append(Damage(shard, *_where(rel), f"{got} bytes, marker says {size} (truncated or rewritten)"))
    for m in MODALITIES:
        for kind in kinds:
            array = vector_array(kind, m)
            if marker["tokens"].get(m, 0) and f"{array}/zarr.json" not in files:
                out.append(Damage(shard, m if kind == "k" else array, "", f"marker says {marker['tokens'][m]} tokens but lists no "
                                                    f"{array.rsplit('/', 1)[1]}"))
    if out:
        return out
    return _check_metadata(store, shard, marker) or _check_arrays(store, shard, marker, quick)


def has_meta_checksums(store: str | Path, shard: str) -> bool:
    """Whether a shard's marker records the crc32c of its metadata (stores written before it do not)."""
    try:
        return isinstance(read_marker(store, shard).get("meta_crc32c"), dict)
    except ValueError:
        return True  # an unreadable marker is damage, reported as such


def verify_store(store: str | Path, quick: bool = False, workers: int = 8,
                 unchecked: list[str] | None = None) -> list[Damage]:
    """Damage in every committed shard, checked in ``workers`` threads, in shard order. ``unchecked``, when
    given, receives the shards whose markers carry no metadata checksums (written before kscale recorded
    them, layout-1 shards included): a same-size edit of their ``zarr.json`` that still parses and opens
    is not found."""
    names = marker_names(store)
    if unchecked is not None:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            unchecked += [n for n, ok in zip(names, pool.map(lambda n: has_meta_checksums(store, n), names))
                          if not ok]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        kinds = store_vectors(read_root_attrs(store)) if names else ()
        found = list(pool.map(lambda n: check_shard(store, n, quick, kinds), names))
    return [d for ds in found for d in ds]


def repair(store: str | Path, damage: list[Damage]) -> list[str]:
    """Un-commit every shard named in ``damage`` (its marker moved aside) and rewrite the index; return
    the shards un-committed. A rerun of the extraction redoes exactly those."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    done = []
    for shard in sorted({d.shard for d in damage}):
        m = marker_path(store, shard)
        if m.exists():
            os.replace(m, m.with_name(f"{shard}.damaged-{stamp}.json"))
            done.append(shard)
    write_index(store, build_index(store))
    return done


def report(damage: list[Damage]) -> list[dict]:
    return [asdict(d) for d in damage]
