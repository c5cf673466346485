"""Issue 22: the shard writer's per-shard fixed costs were cut with not one stored byte changed and every
durability guarantee kept.

- The bytes: a fixed input (keys, queries, values, token tables with video fields, chunks and a tail, an
  attention table; raw and zstd keys) written through ``ShardWriter`` gives exactly the files (sha256 of every
  file) and the marker fields (``files``, ``meta_crc32c``, counts) that main's writer gave at 476fff5, before
  these changes (``tests/golden/store/writer_shard_476fff5.json``, written by that code with this input;
  ``test_store_chunks.py`` checks every file against zarr's own). The array ``zarr.json`` now comes from a
  cached template: equal to ``json.dumps(indent=2)`` for any sizes.
- Threads are made once per process: a commit reuses the fsync pool and the writer thread of the shard before
  (counted by thread starts), and a forked child, which has none of its parent's threads, makes its own
  (its commit would wait forever on the parent's dead pool).
- Every file and folder of a shard is fsynced before the rename into place, on every commit with the reused
  pool; the rename is fsynced before the marker (``os.fsync``/``os.rename``/``os.link`` recorded, real files).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import zarr

import kscale.store.writer as writer_mod
from kscale.store import chunks
from kscale.store.layout import marker_path, read_marker, shard_dir
from kscale.store.writer import ShardWriter
from tests.unit.test_store_v2 import make_store, write_shard

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "store" / "writer_shard_476fff5.json"


def fixed_shard(store: Path, compress: bool) -> dict:
    """The input the golden file was written from (do not change it: the golden file would no longer apply)."""
    g = zarr.open_group(str(store), mode="w")
    g.attrs.update({"format": "kscale-keys", "version": 2, "rope_rows": 3,
                    "token_fields": ["sample_id", "position", "token_id", "image_index", "rope_0", "rope_1", "rope_2",
                                     "video_index", "frame", "time_ms"]})
    rng = np.random.default_rng(7)
    w = ShardWriter(store, "s000003", n_layers=3, n_heads=2, head_dim=4, rope_rows=3, key_dtype="float16",
                    chunk_tokens=8, compress_keys=compress, vectors=("q", "v"))
    for b, (n_text, n_img) in enumerate([(5, 7), (3, 9), (6, 0), (2, 4)]):
        for m, n in (("text", n_text), ("image", n_img)):
            if not n:
                continue
            cols = {"sample_id": np.full(n, b), "position": np.arange(n), "token_id": rng.integers(0, 999, n),
                    "image_index": np.full(n, -1 if m == "text" else 0), "rope_pos": rng.integers(0, 50, (n, 3)),
                    "video_index": np.full(n, -1), "frame": np.full(n, -1), "time_ms": np.full(n, -1)}
            w.append(m, rng.standard_normal((3, n, 2, 4)).astype("float32"), cols,
                     {"q": rng.standard_normal((3, n, 4, 4)), "v": rng.standard_normal((3, n, 2, 4))})
    w.append_table("attention", {"sample_id": np.arange(4), "mass": np.linspace(0, 1, 4)})
    marker = w.commit({"shard": "s000003"}, [])
    shard = store / "shards" / "s000003"
    files = [p for p in sorted(shard.rglob("*")) if p.is_file()]
    return {"files": {p.relative_to(shard).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files},
            "marker": {k: marker[k] for k in ("files", "meta_crc32c", "tokens", "key_bytes", "vector_bytes", "groups")},
            "zstd_files": [p.relative_to(shard).as_posix() for p in files if p.read_bytes()[:4] == ZSTD_MAGIC]}


ZSTD_MAGIC = bytes.fromhex("28b52ffd")  # a zstd frame's first bytes (a compressed inner chunk at offset 0)


def test_shard_bytes_equal_those_of_the_writer_before(tmp_path):
    """Byte for byte with the zstd library the golden file was written with (numcodecs' bundled zstd
    ``VERSION_NUMBER``); with another zstd, whose frames may differ for the same data, the same file names,
    every file that holds no zstd frame, and the marker's metadata checksums and counts."""
    from numcodecs import zstd

    want = json.loads(GOLDEN.read_text())
    same_zstd = zstd.VERSION_NUMBER == want["zstd_version"]
    for compress in (False, True):
        got = json.loads(json.dumps(fixed_shard(tmp_path / f"s{compress}", compress)))
        golden = want[str(compress)]
        if same_zstd:
            assert got["files"] == golden["files"]
            assert got["marker"] == golden["marker"]
            continue
        assert sorted(got["files"]) == sorted(golden["files"])
        plain = set(got["files"]) - set(got["zstd_files"])
        assert plain and {f: got["files"][f] for f in plain} == {f: golden["files"][f] for f in plain}
        for key in ("meta_crc32c", "tokens", "groups"):
            assert got["marker"][key] == golden["marker"][key]
    assert len(want["False"]["files"]) > 40


def test_array_meta_template_is_json_dumps_for_any_sizes():
    rng = random.Random(0)
    for _ in range(500):
        nd = rng.choice([2, 4])
        shape = tuple(rng.choice([0, 1, 4096, 10 ** rng.randint(0, 12)]) for _ in range(nd))
        chunks_ = tuple(rng.randint(1, 10 ** rng.randint(1, 7)) for _ in range(nd))
        inner = rng.choice([None, tuple(rng.randint(1, 5000) for _ in range(nd))])
        dtype = np.dtype(rng.choice(["float16", "float32", "int64", "int8"]))
        attrs = rng.choice([{}, {"fields": ["sample_id", "rope_0"]}, {"b": [1, 2.5], "a": None}])
        dims = tuple(rng.choice("xyz") + str(i) for i in range(nd))
        zstd = rng.random() < 0.5
        want = json.dumps(chunks._array_meta(shape, dtype, chunks_, dims, attrs, inner, zstd), allow_nan=True,
                          indent=2)
        assert chunks.render_array_meta(shape, dtype, chunks_, dims, attrs, inner, zstd) == want


def _starts(monkeypatch) -> list[str]:
    """Names of the writer and fsync threads started from now on (until the test ends; not the staging
    heartbeat, which ends on its own between writers)."""
    names: list[str] = []
    real = threading.Thread.start

    def start(self, *a, **k):
        if self.name.startswith(("kscale-fsync", "kscale-write")):
            names.append(self.name)
        return real(self, *a, **k)
    monkeypatch.setattr(threading.Thread, "start", start)
    return names


def test_commits_reuse_the_fsync_pool_and_the_writer_thread(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", n_shards=1)
    started = _starts(monkeypatch)
    write_shard(store, 1)  # may make them, if no test in this process did yet
    first = len(started)
    assert first <= writer_mod.FSYNC_THREADS + 1
    pool = writer_mod.fsync_pool()
    for s in (2, 3, 4):
        write_shard(store, s)
    assert started[first:] == [], f"commits after the first started threads: {started[first:]}"
    assert writer_mod.fsync_pool() is pool
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("kscale-fsync", "kscale-write"))]
    assert len(alive) <= writer_mod.FSYNC_THREADS + writer_mod.IDLE_WRITE_THREADS, alive


def test_a_writer_hands_its_thread_on_only_when_its_writes_are_done(tmp_path):
    store = make_store(tmp_path / "s", n_shards=0)
    a = ShardWriter(store, "s000000", n_layers=2, n_heads=3, head_dim=4, rope_rows=3, key_dtype="float16",
                    chunk_tokens=4)
    done = []
    a.submit(lambda: (time.sleep(0.3), done.append("a")))
    a.abort()
    assert done == ["a"] and a.pool is None
    b = ShardWriter(store, "s000001", n_layers=2, n_heads=3, head_dim=4, rope_rows=3, key_dtype="float16",
                    chunk_tokens=4)
    b.pool.shutdown(wait=True)  # what some tests do to wait for a writer's writes: never handed on then
    b.abort()
    c = ShardWriter(store, "s000002", n_layers=2, n_heads=3, head_dim=4, rope_rows=3, key_dtype="float16",
                    chunk_tokens=4)
    c.submit(done.append, "c")  # a shut-down executor would refuse this
    c.abort()
    assert done == ["a", "c"]


def test_a_forked_child_commits_with_threads_of_its_own(tmp_path):
    store = make_store(tmp_path / "s", n_shards=2)  # the parent has its pool and an idle writer thread now
    assert writer_mod.fsync_pool() is not None
    pid = os.fork()
    if pid == 0:  # the child: commit a shard, report through the exit status
        code = 1
        try:
            write_shard(store, 2)
            code = 0 if read_marker(store, "s000002") else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30  # the commit takes well under a second
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child's commit hung (it waited on its parent's threads)")
    assert os.waitstatus_to_exitcode(status) == 0
    write_shard(store, 3)  # and the parent's pool still works
    assert read_marker(store, "s000003")


def test_every_file_and_folder_is_fsynced_before_the_rename_on_every_commit(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", n_shards=1)  # the pool exists: the commits below reuse it
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        with lock:
            events.append(("fsync", path))  # after it returned: durable from here on

    def rename(a, b, *args, **kw):
        with lock:
            events.append(("rename", f"{os.fspath(a)} -> {os.fspath(b)}"))
        return real_rename(a, b, *args, **kw)

    def link(a, b, *args, **kw):
        with lock:
            events.append(("link", os.fspath(b)))
        return real_link(a, b, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    for s in (1, 2):
        write_shard(store, s)
    monkeypatch.undo()
    for s in (1, 2):
        final = shard_dir(store, f"s{s:06d}")
        renamed_at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1].endswith(f" -> {final}"))
        staging = events[renamed_at][1].split(" -> ")[0]
        marker_at = events.index(("link", str(marker_path(store, f"s{s:06d}"))))
        synced = {p for kind, p in events[:renamed_at] if kind == "fsync"}
        files = read_marker(store, f"s{s:06d}")["files"]
        assert len(files) > 8
        missing = [f for f in files if os.path.join(staging, f) not in synced]
        assert not missing, f"not fsynced before the rename: {missing}"
        folders = {staging} | {os.path.join(staging, f).rsplit("/", 1)[0] for f in files}
        assert folders <= synced, sorted(folders - synced)
        assert ("fsync", str(final.parent)) in events[renamed_at:marker_at]
