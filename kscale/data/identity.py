"""What the data of a job *is*, for resume: a content identity recorded beside every output.

``data_identity(dspec)`` is a small JSON-able dict: for a manifest the SHA-256 of its bytes (and its
size); for a saved Hugging Face dataset the fingerprints Arrow wrote into each split's ``state.json``
with the names and sizes of its data files (hashing terabytes of Arrow files on every resume would cost
more than the run); for generated data its parameters (already in the spec). The output policy
(:func:`kscale.output.apply_policy`) compares it with the one recorded by the run being resumed and
refuses a change with :class:`kscale.output.DataChanged`, saying what changed. ``JobSpec.fingerprint()``
hashes it too, so a changed manifest is also a different spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

_CACHE: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a manifest is hashed once per process


def remember_sha256(path: Path, st, sha: str) -> None:
    """Record a hash computed elsewhere (the manifest index's pass reads every byte anyway)."""
    _CACHE[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = sha


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, once per process per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]


def data_identity(dspec: Any) -> dict:
    """The data's content identity (see module docstring); ``{"source": ..., "unreadable": why}`` when the
    data cannot be read here (e.g. a path that exists only on the cluster)."""
    if dspec is None:
        return {}
    if dspec.source == "generated":
        return {"source": "generated"}  # a pure function of data.generated, which the spec fingerprint covers
    path = Path(dspec.path).expanduser()
    try:
        if dspec.source in ("parquet", "webdataset", "hf"):
            return _files_identity(dspec)
        if dspec.source == "manifest":
            return {"source": "manifest", "path": dspec.path, "sha256": file_sha256(path), "bytes": path.stat().st_size}
        states = {}
        for state in sorted(path.rglob("state.json")):
            meta = json.loads(state.read_text())
            files = [[f["filename"], (state.parent / f["filename"]).stat().st_size] for f in meta.get("_data_files", [])]
            states[str(state.parent.relative_to(path))] = {"fingerprint": meta.get("_fingerprint"), "files": files}
        return {"source": "hf_disk", "path": dspec.path, "splits": states}
    except (OSError, ValueError, KeyError, tarfile.TarError) as e:
        return {"source": dspec.source, "unreadable": f"{type(e).__name__}: {e}"}


def _files_identity(dspec: Any) -> dict:
    """Parquet: each file's name, size and footer hash; WebDataset: each tar's name, size and member-index
    hash; hf: the Arrow fingerprint and cache files (see each source's module)."""
    if dspec.source == "hf":
        from kscale.data.hub import identity

        return identity(dspec)
    from kscale.data.files import data_files

    files = data_files(dspec.path, ".parquet" if dspec.source == "parquet" else ".tar")
    common = os.path.commonpath([str(f.parent) for f in files])
    out = []
    for f in files:
        st = f.stat()
        key = (dspec.source, str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _CACHE:
            if dspec.source == "parquet":
                from kscale.data.parquet import footer_sha256

                _CACHE[key] = footer_sha256(f)
            else:
                from kscale.data.webdataset import index_tar

                _CACHE[key] = index_tar(f)["sha256"]
        out.append([os.path.relpath(f, common), st.st_size, _CACHE[key]])
    return {"source": dspec.source, "path": dspec.path, "files": out}


def describe_change(old: dict, new: dict) -> str:
    """One sentence on how ``old`` (recorded) and ``new`` (now) identities differ."""
    where = new.get("path", "data")
    if old.get("source") != new.get("source"):
        return f"data.source was {old.get('source')!r}, now {new.get('source')!r}"
    if new.get("source") == "manifest":
        return (f"the manifest {where!r} changed since this output was written (sha256 {str(old.get('sha256'))[:12]}, "
                f"{old.get('bytes')} bytes then; {str(new.get('sha256'))[:12]}, {new.get('bytes')} bytes now)")
    if new.get("source") == "hf_disk":
        changed = sorted(k for k in set(old.get("splits", {})) | set(new.get("splits", {}))
                         if old.get("splits", {}).get(k) != new.get("splits", {}).get(k))
        return f"the saved dataset {where!r} changed since this output was written (in {', '.join(changed) or 'its files'})"
    if new.get("source") in ("parquet", "webdataset", "hf"):
        if "files" in old and "files" in new and old.get("fingerprint") == new.get("fingerprint"):
            then = {f[0]: f[1:] for f in old["files"]}
            now = {f[0]: f[1:] for f in new["files"]}
            changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
            return (f"the {new['source']} data {where!r} changed since this output was written "
                    f"(in {', '.join(changed[:5])})")
        return f"the {new['source']} data {where!r} changed since this output was written"
    return f"the data changed since this output was written ({old} then, {new} now)"
