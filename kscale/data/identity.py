"""What the data of a job *is*, for resume: a content identity recorded beside every output.

``data_identity(dspec)`` is a small JSON-able dict: for a manifest the SHA-256 of its bytes (and its
size) and a digest of the size and mtime of every image file it names (:func:`images_identity`); for a
saved Hugging Face dataset the fingerprints Arrow wrote into each split's ``state.json`` with the names
and sizes of its data files (hashing terabytes of Arrow files on every resume would cost more than the
run); for generated data its full parameters (seed, counts, image size, tasks, limit). An analysis run
records the identity of the key stores it reads (``source: stores``). The output policy
(:func:`kscale.output.apply_policy`) compares it with the one recorded by the run being resumed and
refuses a change with :class:`kscale.output.DataChanged`, saying what changed. ``JobSpec.fingerprint()``
hashes it too (without the image files: one stat per image on every fingerprint would be too dear), so a
changed manifest is also a different spec.
"""

from __future__ import annotations

import dataclasses
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


def _image_refs(path: Path, image_field: str) -> list[tuple[int, str]]:
    """(line, path) of every image file the manifest names, resolved as the manifest source resolves them
    (relative to the manifest's folder). Rows that do not parse, inline bytes and nulls name no file."""
    out = []
    for i, raw in enumerate(path.read_bytes().splitlines()):
        try:
            row = json.loads(raw)
            ref = row.get(image_field) if isinstance(row, dict) else None
            if isinstance(ref, dict) and not ref.get("bytes"):
                ref = ref.get("path")
        except Exception:  # noqa: BLE001 - a bad row is that row's error at extraction, not the identity's
            continue
        if isinstance(ref, str) and ref:
            out.append((i, str(Path(ref) if Path(ref).is_absolute() else path.parent / ref)))
    return out


def images_identity(path: Path, image_field: str) -> dict:
    """What the image files a manifest names are, cheaply: the SHA-256 of (line, path, size, mtime_ns) of
    each (one ``stat`` per file, no file read: hashing every image would cost a second read of the data
    set on every run). An edit of an image changes its size or mtime (``cp``, editors, rsync without
    ``--times`` all set a new mtime); ``missing`` counts files that do not exist."""
    h, n, missing = hashlib.sha256(), 0, 0
    for line, ref in _image_refs(path, image_field):
        try:
            st = os.stat(ref)
            h.update(f"{line}\0{ref}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            missing += 1
            h.update(f"{line}\0{ref}\0missing\n".encode())
        n += 1
    return {"files": n, "missing": missing, "stat_sha256": h.hexdigest()}


def videos_identity(path: Path, video_field: str) -> dict:
    """:func:`images_identity` of the videos a manifest names (``data.video_field``): an animated file's
    stat, and for a folder of frames each frame file's (an edited, added or removed frame changes it)."""
    from kscale.data.video import FRAME_SUFFIXES

    h, n, missing = hashlib.sha256(), 0, 0
    for line, ref in _image_refs(path, video_field):
        p = Path(ref)
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES) if p.is_dir() else [p]
        for f in files:
            try:
                st = os.stat(f)
                h.update(f"{line}\0{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                missing += 1
                h.update(f"{line}\0{f}\0missing\n".encode())
        n += 1
    return {"videos": n, "missing": missing, "stat_sha256": h.hexdigest()}


def data_identity(dspec: Any, images: bool = True) -> dict:
    """The data's content identity (see module docstring); ``{"source": ..., "unreadable": why}`` when the
    data cannot be read here (e.g. a path that exists only on the cluster). ``images=False`` leaves out
    the manifest's image files (one stat each): what the spec fingerprint hashes, which must stay cheap."""
    if dspec is None:
        return {}
    if dspec.source == "generated":  # a pure function of its parameters
        return {"source": "generated", "generated": dataclasses.asdict(dspec.generated), "limit": dspec.limit}
    path = Path(dspec.path).expanduser()
    try:
        if dspec.source in ("parquet", "webdataset", "hf"):
            return _files_identity(dspec)
        if dspec.source == "manifest":
            out = {"source": "manifest", "path": dspec.path, "sha256": file_sha256(path), "bytes": path.stat().st_size}
            if images and getattr(dspec, "video_field", None):
                out["videos"] = videos_identity(path, dspec.video_field)
            return {**out, "images": images_identity(path, dspec.image_field)} if images else out
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


def identity_changed(recorded: dict, now: dict) -> bool:
    """Whether the data changed: every part ``recorded`` holds must be the same now. An identity recorded
    by an older kscale holds fewer parts (generated data: only its source; a manifest: no images): those
    it lacks are not compared (the spec fingerprint still covers generated data's parameters)."""
    return recorded.get("source") != now.get("source") or any(now.get(k) != v for k, v in recorded.items())


def describe_change(old: dict, new: dict) -> str:
    """One sentence on how ``old`` (recorded) and ``new`` (now) identities differ."""
    where = new.get("path", "data")
    if old.get("source") != new.get("source"):
        return f"data.source was {old.get('source')!r}, now {new.get('source')!r}"
    if new.get("source") == "generated":
        was, now = old.get("generated") or {}, new.get("generated") or {}
        diffs = [f"data.generated.{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(was) | set(now))
                 if was.get(k) != now.get(k)]
        if old.get("limit") != new.get("limit"):
            diffs.append(f"data.limit was {old.get('limit')!r}, now {new.get('limit')!r}")
        return "the generated data changed since this output was written: " + "; ".join(diffs)
    if new.get("source") == "manifest" and old.get("sha256") == new.get("sha256") and \
            old.get("videos") != new.get("videos") and old.get("images") == new.get("images"):
        was, now = old.get("videos") or {}, new.get("videos") or {}
        return (f"a video that the manifest {where!r} names changed since this output was written (size or "
                f"modification time of the files of its {now.get('videos')} videos: stat digest "
                f"{str(was.get('stat_sha256'))[:12]} then, {str(now.get('stat_sha256'))[:12]} now; "
                f"{now.get('missing')} missing now)")
    if new.get("source") == "manifest" and old.get("sha256") == new.get("sha256"):
        was, now = old.get("images") or {}, new.get("images") or {}
        return (f"an image file that the manifest {where!r} names changed since this output was written (size or "
                f"modification time of its {now.get('files')} image files: stat digest {str(was.get('stat_sha256'))[:12]} "
                f"then, {str(now.get('stat_sha256'))[:12]} now; {now.get('missing')} missing now)")
    if new.get("source") == "manifest":
        return (f"the manifest {where!r} changed since this output was written (sha256 {str(old.get('sha256'))[:12]}, "
                f"{old.get('bytes')} bytes then; {str(new.get('sha256'))[:12]}, {new.get('bytes')} bytes now)")
    if new.get("source") == "stores":
        was, now = old.get("stores") or {}, new.get("stores") or {}
        diffs = [f"store {p!r}: {was.get(p)} then, {now.get(p)} now" for p in sorted(set(was) | set(now))
                 if was.get(p) != now.get(p)]
        return "the key stores analysed changed since this output was written: " + "; ".join(diffs)
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
