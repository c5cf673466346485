"""The byte-offset index of a JSONL manifest: a worker seeks to its shard's lines instead of reading the file.

Built once, by the driver while it plans (``open_source(dspec, index_dir, plan=True)``), in one streamed pass
that also hashes the file (the manifest's data identity, :mod:`kscale.data.identity`) and, with
``data.id_field``, finds every duplicate id. Stored in the job's index folder (:func:`index_dir`, beside the
output) as three files per (manifest, id field)::

    manifest-<key>.rows.npy    (n, 2) int64: byte start and end of each non-blank line, in file order
    manifest-<key>.dups.npy    (m, 2) int64: (row, first row with the same id) for every later duplicate
    manifest-<key>.json        what it was built from: sha256, size, mtime_ns, rows, id field (written last)

Workers open the arrays memory-mapped (their RSS grows with the lines they read, not the file) and check
the manifest's size and mtime against the JSON: a manifest changed since planning is
:class:`DataIndexStale`, never a silent mix. The driver checks the sha256 and rebuilds a stale index.

Duplicates without holding every id: the pass keeps one 64-bit hash per row (8 bytes a row, in the driver
only), sorts them, and rereads just the rows whose hashes collide to compare their real ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kscale.errors import KscaleError

INDEX_VERSION = 1


class DataIndexStale(KscaleError):
    """A data file changed after its index was built for this job (the run's plan no longer holds)."""


def index_dir(output_path: str | Path) -> Path:
    """Where a job's data indexes live: ``.<output name>.data-index/`` beside the output. Beside, not in:
    the driver plans (and so indexes) before the output is created, and an ``overwrite`` that replaces the
    output keeps the indexes, which stay valid as long as the data's identity does."""
    p = Path(output_path).expanduser()
    return p.parent / f".{p.name}.data-index"


def index_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def write_atomic(path: Path, write) -> None:
    """``write(f)`` into a temp sibling, then rename: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class LineIndex:
    rows: np.ndarray  # (n, 2) int64 byte [start, end) of each non-blank line
    duplicate_of: dict[int, int]  # later row -> first row with the same id
    meta: dict

    def __len__(self) -> int:
        return len(self.rows)


def _row_id(raw: bytes, i: int, id_field: str) -> str | None:
    """The id of one line as the manifest source computes it; None for a line that is not a JSON object."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5,000-digit number, nesting too deep
        return None
    return str(row.get(id_field, i)) if isinstance(row, dict) else None


def scan(path: Path, id_field: str | None) -> LineIndex:
    """One streamed pass: line offsets, sha256 and duplicate ids (memory: 16 bytes a line, 24 with ids)."""
    st = path.stat()
    h = hashlib.sha256()
    starts, ends, hashes = array("q"), array("q"), array("q")
    pos = 0
    with open(path, "rb") as f:
        for raw in f:
            h.update(raw)
            if raw.strip():
                if id_field is not None:
                    rid = _row_id(raw, len(starts), id_field)
                    hashes.append(0 if rid is None else hash(rid) | 1)  # 0: no id (never a duplicate)
                starts.append(pos)
                ends.append(pos + len(raw))
            pos += len(raw)
    rows = np.stack([np.frombuffer(starts, np.int64), np.frombuffer(ends, np.int64)], axis=1) if starts else \
        np.zeros((0, 2), np.int64)
    dups = _duplicates(path, rows, np.frombuffer(hashes, np.int64), id_field) if id_field else {}
    meta = {"version": INDEX_VERSION, "path": str(path.resolve()), "sha256": h.hexdigest(), "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns, "rows": len(rows), "id_field": id_field}
    return LineIndex(rows, dups, meta)


def _duplicates(path: Path, rows: np.ndarray, hashes: np.ndarray, id_field: str) -> dict[int, int]:
    """Rows whose id an earlier row already has: hash collisions first, then the real ids of those rows."""
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    same = (sorted_h[1:] == sorted_h[:-1]) & (sorted_h[1:] != 0)
    candidates = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    out: dict[int, int] = {}
    firsts: dict[str, int] = {}
    with open(path, "rb") as f:
        for i in candidates.tolist():  # ascending: the first row of an id is met first
            f.seek(int(rows[i, 0]))
            rid = _row_id(f.read(int(rows[i, 1] - rows[i, 0])), i, id_field)
            if rid is not None and firsts.setdefault(rid, i) != i:
                out[i] = firsts[rid]
    return out


def _files(folder: Path, path: Path, id_field: str | None) -> tuple[Path, Path, Path]:
    stem = folder / f"manifest-{index_key(path.resolve(), id_field)}"
    return stem.with_suffix(".json"), Path(f"{stem}.rows.npy"), Path(f"{stem}.dups.npy")


def save(index: LineIndex, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta_file, rows_file, dups_file = _files(folder, Path(index.meta["path"]), index.meta["id_field"])
    dups = np.array(sorted(index.duplicate_of.items()), np.int64).reshape(-1, 2)
    write_atomic(rows_file, lambda f: np.save(f, index.rows))
    write_atomic(dups_file, lambda f: np.save(f, dups))
    write_atomic(meta_file, lambda f: f.write(json.dumps(index.meta, sort_keys=True).encode()))  # last: commit


def load(folder: Path, path: Path, id_field: str | None) -> LineIndex | None:
    """The saved index of ``path`` (rows memory-mapped), None when there is none."""
    meta_file, rows_file, dups_file = _files(folder, path, id_field)
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != INDEX_VERSION:
            return None
        rows = np.load(rows_file, mmap_mode="r")
        dups = {int(a): int(b) for a, b in np.load(dups_file)}
    except (OSError, ValueError):
        return None
    return LineIndex(rows, dups, meta)


def open_index(path: Path, id_field: str | None, folder: Path | None, plan: bool) -> LineIndex:
    """The line index of ``path``.

    Without ``folder``: scanned now, kept in memory. With one: loaded when it matches the file, else built
    and saved. A worker (``plan=False``) trusts a saved index whose size and mtime match and refuses one that
    does not (:class:`DataIndexStale`: the data changed after planning); the planner (``plan=True``) checks
    the content hash and rebuilds.
    """
    if folder is None:
        return scan(path, id_field)
    index = load(folder, path, id_field)
    st = path.stat()
    if index is not None:
        same_stat = (index.meta["bytes"], index.meta["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        if not plan:
            if not same_stat:
                raise DataIndexStale(
                    f"data.path: the manifest {str(path)!r} changed after this job indexed it ({index.meta['bytes']} "
                    f"bytes then, {st.st_size} now): plan the job again")
            return index
        from kscale.data.identity import file_sha256

        if index.meta["sha256"] == file_sha256(path) and index.meta["bytes"] == st.st_size:
            if not same_stat:  # same bytes, touched: record the new mtime so workers accept it
                index.meta["mtime_ns"] = st.st_mtime_ns
                save(index, folder)
            return index
    index = scan(path, id_field)
    save(index, folder)
    from kscale.data.identity import remember_sha256

    remember_sha256(path, st, index.meta["sha256"])  # the identity need not read the file again
    return index
