"""The files a ``data.path`` names (a file, a glob or a folder), in one stable order for every worker."""

from __future__ import annotations

import glob
from pathlib import Path


def data_files(path: str, suffix: str) -> list[Path]:
    """Sorted files of ``path``: itself, the files a glob matches, or the ``*suffix`` files under a folder
    (recursively). Sorted by path, so sample ids are the same wherever the list is made."""
    p = Path(path).expanduser()
    if glob.has_magic(str(p)):
        files = [Path(f) for f in glob.glob(str(p), recursive=True)]
    elif p.is_dir():
        files = list(p.rglob(f"*{suffix}"))
    elif p.is_file():
        files = [p]
    else:
        raise ValueError(f"{path!r} does not exist")
    files = sorted(f for f in files if f.is_file())
    if not files:
        raise ValueError(f"{path!r} names no {suffix} file")
    return files


def file_stats(files: list[Path]) -> list[list]:
    """[[path, size, mtime_ns], ...]: what a worker checks to trust an index made at planning."""
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def json_index(folder: Path | None, name: str, files: list[Path], build, plan: bool, what: str) -> dict:
    """The JSON index ``name`` of ``files``: ``build()`` returns it (a dict); saved in ``folder`` with the
    files' stats. A worker (``plan=False``) trusts a saved index whose stats match the files and refuses one
    that does not (:class:`kscale.data.lineindex.DataIndexStale`); the planner rebuilds it. Without a
    folder it is built in memory."""
    import json

    from kscale.data.lineindex import DataIndexStale, write_atomic

    stats = file_stats(files)
    if folder is None:
        return build()
    path = folder / name
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if saved is not None and saved.get("stats") == stats:
        return saved["index"]
    if saved is not None and not plan:
        raise DataIndexStale(f"data.path: {what} changed after this job indexed it: plan the job again")
    index = build()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(json.dumps({"stats": stats, "index": index}).encode()))
    return index


def find_duplicates(ids) -> dict[int, int]:
    """Later row -> first row with the same id, from ``(row, id)`` pairs in row order (run by the planner:
    the ids pass through its memory once; workers load only the duplicates)."""
    firsts: dict[str, int] = {}
    out: dict[int, int] = {}
    for i, v in ids:
        if firsts.setdefault(str(v), i) != i:
            out[i] = firsts[str(v)]
    return out


def duplicates_index(folder: Path | None, name: str, files: list[Path], ids, plan: bool, what: str) -> dict[int, int]:
    """:func:`find_duplicates` of ``ids()`` kept as a JSON index (see :func:`json_index`)."""
    index = json_index(folder, name, files, lambda: {"dups": sorted(find_duplicates(ids()).items())}, plan, what)
    return {int(a): int(b) for a, b in index["dups"]}
