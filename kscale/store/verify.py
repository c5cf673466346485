"""``kscale verify STORE [--repair]``: check every committed shard, and un-commit the damaged ones.

A shard is checked against its own marker (layout 2): the marker must parse; every file it lists must
exist with the recorded size; each array's shape must match the marker's token counts; and (unless
``quick``) every chunk is decoded, which checks its crc32c. Shards are checked in parallel threads (the
work is file reads and crc32c, which release the GIL). Layout-1 shards have no sizes or checksums:
only missing chunk files and undecodable chunks are found.

``repair`` moves each damaged shard's marker aside (``sNNNNNN.damaged-<time>.json``), rewrites the
index, and leaves the shard's files for the next extraction run, which deletes and redoes exactly those
shards (a shard without a marker is not committed). Nothing else is touched.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import zarr

from kscale.store.index import build_index, write_index
from kscale.store.layout import MODALITIES, marker_path, marker_names, read_marker, shard_dir


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


def _check_arrays(store: Path, shard: str, marker: dict, quick: bool) -> list[Damage]:
    out = []
    d = shard_dir(store, shard)
    arrays = sorted({f.rsplit("/", 1)[0] for f in marker["files"] if f.endswith("/zarr.json")})
    for rel in arrays:
        try:
            arr = zarr.open_array(str(d / rel), mode="r")
        except Exception:  # noqa: BLE001 - not an array (a group's zarr.json) or unreadable: sizes said so
            continue
        mod = rel.split("/")[-2] if rel.count("/") else ""
        if rel.endswith(("/keys", "/tokens")) and mod in MODALITIES:
            want = marker["tokens"].get(mod, 0)
            n = arr.shape[1] if rel.endswith("/keys") else arr.shape[0]
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


def check_shard(store: str | Path, shard: str, quick: bool = False) -> list[Damage]:
    """Every problem of one committed shard (empty when it is sound)."""
    store = Path(store)
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
            out.append(Damage(shard, rel.rsplit("/", 1)[0], rel.rsplit("/", 1)[-1], "file missing"))
            continue
        if got != size:
            out.append(Damage(shard, rel.rsplit("/", 1)[0], rel.rsplit("/", 1)[-1],
                              f"{got} bytes, marker says {size} (truncated or rewritten)"))
    for m in MODALITIES:
        if marker["tokens"].get(m, 0) and f"{m}/keys/zarr.json" not in files:
            out.append(Damage(shard, m, "", f"marker says {marker['tokens'][m]} tokens but lists no keys"))
    if out:
        return out
    return _check_arrays(store, shard, marker, quick)


def verify_store(store: str | Path, quick: bool = False, workers: int = 8) -> list[Damage]:
    """Damage in every committed shard, checked in ``workers`` threads, in shard order."""
    names = marker_names(store)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = list(pool.map(lambda n: check_shard(store, n, quick), names))
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
