"""Writes one shard of a key store (layout version 2): buffered appends, whole-chunk writes on a
background thread, a staging folder renamed at commit, and a marker created exclusively, last.

A ``ShardWriter`` writes ``shards/.<name>.tmp-<host>-<pid>-<token>/`` (``layout.staging_dir``), which no
reader and no other writer looks at; beside it an owner record whose mtime is the writer's heartbeat. Another
process deletes that folder only when its writer is provably dead (``kscale.store.staging``), so two live
writers of one shard (a retried task, a node presumed lost) both write on and the commit keeps one.
``append`` buffers token rows per modality and hands whole ``chunk_tokens`` blocks to one background thread,
so writing overlaps the next forward pass. ``commit`` waits for the writes, flushes the tails, lists every
file with its size (and the crc32c of each ``zarr.json``), fsyncs every file and folder of the staging
folder, then (checking right before each step that the shard has no marker) deletes a partial
``shards/<name>/`` left by a killed run, checks that its staging folder is still its own (``StagingLost``
otherwise), renames it into place, fsyncs ``shards/`` and creates the marker exclusively (fsynced too): a
committed shard is durable, never a marker over files a power loss emptied. A shard with a marker is never
deleted or written into: the constructor and the commit refuse with ``ShardCommitted``.

Keys use Zarr's sharding codec: one file per ``chunk_tokens`` rows holding every layer, an inner chunk
per layer (reading one layer reads only its bytes), crc32c on every inner chunk and on the shard index.
The token table is one int64 array (token, field), zstd + crc32c.

Queries and values (``vectors``: "q", "v") are written beside keys in the same way: the same rows, the same
chunking and sharding, one more file per ``chunk_tokens`` rows and kind, in ``queries/<modality>/queries``
and ``values/<modality>/values`` (``layout.vector_array``).

Memory per writer is bounded: per modality at most ``chunk_tokens - 1`` buffered rows plus the batch
being appended, and at most ``max_inflight`` whole blocks queued or being written (``append`` waits for
the oldest write beyond that). With L layers, H KV heads, D dims and b bytes per value that is about
``(4 * (chunk_tokens + batch_tokens) + max_inflight * chunk_tokens) * L * H' * D * b`` (4 modalities),
``H' = H`` for keys alone, ``+ G * H`` with queries (G query heads per KV head), ``+ H`` with values.

Legend: L layers, N tokens, H kv heads, D head dim, R rope rows, F token fields.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec  # side tables (attention)

from kscale.output import create_json_exclusive, fence, read_json, write_json_atomic
from kscale.store.chunks import (file_crc32c, fsync_path, write_array_meta, write_group_meta, write_key_shard,
                                 write_table_chunk)
from kscale.store.layout import (COLUMN_FILL, MODALITIES, SHARD_LAYOUT, STORE_VERSION, TOKEN_DIMS,
                                 VECTOR_DIMS, VECTOR_GROUPS, VIDEO_FIELDS, keys_chunk_file, marker_path, shard_dir,
                                 token_fields, tokens_chunk_file, vector_array)
from kscale.store.staging import Staging, StagingLost, let_die, sweep  # noqa: F401  (StagingLost: re-exported)


FSYNC_THREADS = 16  # concurrent fsyncs at commit

IDLE_WRITE_THREADS = 4  # writer threads kept for the next writers of this process

# Threads are made once per process and reused, not started per shard (a shard started ~12: its writer
# thread and up to 16 fsync threads, ~2-3 ms of CPU, ~5% of a cheap shard's fixed costs): one pool of
# ``FSYNC_THREADS`` fsync threads made at the first commit, and the single-thread executors of finished
# writers, handed to the next writers (each writer still has one thread of its own while it is open: its
# writes run in order). A forked child starts without them (the parent's threads do not exist there):
# ``_after_fork`` forgets them, and the pid check covers a fork that ran no at-fork handlers.
_POOLS: dict = {"pid": None, "fsync": None, "idle": []}
_POOLS_LOCK = threading.Lock()


def _pools() -> dict:
    """This process's pools (the caller holds ``_POOLS_LOCK``); emptied in a process other than theirs."""
    if _POOLS["pid"] != os.getpid():
        _POOLS.update(pid=os.getpid(), fsync=None, idle=[])
    return _POOLS


def fsync_pool() -> ThreadPoolExecutor:
    """This process's fsync threads (``FSYNC_THREADS``), made on first use."""
    with _POOLS_LOCK:
        pools = _pools()
        if pools["fsync"] is None:
            pools["fsync"] = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="kscale-fsync")
        return pools["fsync"]


def _take_write_thread() -> ThreadPoolExecutor:
    """A single-thread executor for one writer's writes: an idle one of this process, else a new one."""
    with _POOLS_LOCK:
        idle = _pools()["idle"]
        if idle:
            return idle.pop()
    pool = ThreadPoolExecutor(1, thread_name_prefix="kscale-write")
    pool.kscale_pid = os.getpid()  # whose thread it has
    return pool


def _give_back_write_thread(pool: ThreadPoolExecutor) -> None:
    """Keep a writer's executor (every write of it finished) for the next writer, or end its thread."""
    if getattr(pool, "_shutdown", False) or getattr(pool, "kscale_pid", None) != os.getpid():
        return  # shut down by its user (tests wait for writes so), or a parent process's: not reusable
    with _POOLS_LOCK:
        idle = _pools()["idle"]
        if len(idle) < IDLE_WRITE_THREADS:
            idle.append(pool)
            return
    pool.shutdown(wait=False)


def _after_fork() -> None:
    global _POOLS_LOCK
    _POOLS.update(pid=None, fsync=None, idle=[])
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class ShardCommitted(RuntimeError):
    """The shard has a commit marker: it is never rewritten. ``marker`` is what the marker says."""

    def __init__(self, store: Path, name: str):
        self.marker = read_json(marker_path(store, name)) or {}
        super().__init__(f"shard {name} of store {str(store)!r} is committed ({marker_path(store, name).name}); "
                         "refusing to rewrite it")


def token_table(cols: dict[str, np.ndarray], rope_rows: int, video: bool = False) -> np.ndarray:
    """(N, F) int64 token table from the worker's columns (``TABLE_COLUMNS`` names); ``video``: with the
    ``VIDEO_FIELDS`` (-1 where the worker gives none)."""
    n = len(cols["sample_id"])
    out = np.empty((n, len(token_fields(rope_rows, video))), dtype=np.int64)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = (cols["sample_id"], cols["position"], cols["token_id"],
                                                  cols["image_index"])
    out[:, 4:4 + rope_rows] = np.asarray(cols["rope_pos"]).reshape(n, rope_rows)
    for j, name in enumerate(VIDEO_FIELDS if video else ()):
        out[:, 4 + rope_rows + j] = cols.get(name, COLUMN_FILL)
    return out


class _ModalityBuffer:
    """Rows of one modality of one shard: keys, the token table and, when the store holds them, the q/v
    vectors of the same rows. Arrays are created at the first write with its size and resized by later
    writes (only whole chunks until the final one). Every file is written with ``kscale.store.chunks``
    (what zarr would write, without its per-chunk overhead); every kind is chunked and checked like keys."""

    def __init__(self, modality: str, writer: ShardWriter):
        self.modality, self.folder, self.w = modality, writer.dir / modality, writer
        write_group_meta(self.folder, {})
        for kind in writer.vectors:
            write_group_meta(writer.dir / VECTOR_GROUPS[kind] / modality, {})
        self.chunk, self.n_written = writer.chunk, 0
        self.c = 0  # rows per chunk file, fixed by the first write
        self.pending: dict[str, list[np.ndarray]] = {kind: [] for kind in ("k", *writer.vectors)}
        self.pending_table: list[np.ndarray] = []
        self.n_pending = 0

    def _meta(self, vectors: dict[str, np.ndarray], table_NF: np.ndarray, n: int) -> None:
        c = self.c
        for kind, v_LNHD in vectors.items():
            L, _, H, D = v_LNHD.shape
            write_array_meta(self.w.dir / vector_array(kind, self.modality), (L, n, H, D), v_LNHD.dtype,
                             (L, c, H, D), VECTOR_DIMS[kind], {}, inner=(1, c, H, D), zstd=self.w.compress_keys)
        write_array_meta(self.folder / "tokens", (n, table_NF.shape[1]), table_NF.dtype, (c, table_NF.shape[1]),
                         TOKEN_DIMS, {"fields": list(token_fields(self.w.R, self.w.video))})

    def append(self, vectors: dict[str, np.ndarray], table_NF: np.ndarray) -> None:
        for kind, part in self.pending.items():
            part.append(vectors[kind])
        self.pending_table.append(table_NF)
        self.n_pending += len(table_NF)
        if self.n_pending >= self.chunk:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write buffered rows: whole chunks only, unless ``final``."""
        if not self.n_pending:
            return
        vectors = {kind: np.concatenate(p, axis=1) for kind, p in self.pending.items()}
        table = np.concatenate(self.pending_table, axis=0)
        n = len(table) if final else (len(table) // self.chunk) * self.chunk
        a, b = self.n_written, self.n_written + n
        self.w.submit(self._write, a, b, {kind: v[:, :n] for kind, v in vectors.items()}, table[:n])
        self.n_written = b
        self.pending = {kind: [v[:, n:]] if n < len(table) else [] for kind, v in vectors.items()}
        self.pending_table = [table[n:]] if n < len(table) else []
        self.n_pending = len(table) - n

    def _write(self, a: int, b: int, vectors: dict[str, np.ndarray], table_NF: np.ndarray) -> None:
        """Rows [a, b) (``a`` on a chunk boundary): the arrays' metadata, then each chunk file whole."""
        if not self.c:
            # A first write is either whole chunks or, in a shard holding fewer than chunk_tokens rows of this
            # modality, all of them: then one chunk of exactly N rows (a fixed chunk would pad the file to
            # chunk_tokens rows: 115 MB per modality for a 7B model). Readers cut blocks at chunk_tokens either way.
            self.c = min(self.chunk, b - a)
        c = self.c
        assert a % c == 0, (a, c)
        self._meta(vectors, table_NF, b)
        for i in range(a, b, c):
            for kind, v_LNHD in vectors.items():
                write_key_shard(self.w.dir / vector_array(kind, self.modality) / keys_chunk_file(i // c),
                                v_LNHD[:, i - a:i - a + c], c, self.w.compress_keys)
            write_table_chunk(self.folder / "tokens" / tokens_chunk_file(i // c), table_NF[i - a:i - a + c], c)


def _root_attrs(store: Path) -> dict:
    try:
        with open(store / "zarr.json", "rb") as f:
            return json.loads(f.read()).get("attributes", {})
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return {}


def _check_root(store: Path, attrs: dict) -> None:
    """``attrs``: the root's attributes (``_root_attrs``; empty without a root ``zarr.json``)."""
    if attrs:
        version = attrs.get("version", STORE_VERSION)
        if version != STORE_VERSION:
            raise ValueError(f"store {store} has format version {version}; this kscale writes version "
                             f"{STORE_VERSION}: write to a new output.path (version {version} stores stay readable)")
    shards = store / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    if not (shards / "zarr.json").is_file():  # keeps the hierarchy walkable by plain zarr
        write_json_atomic(shards / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}})


def sweep_staging(store: str | Path) -> list[str]:
    """Remove what dead writers left in ``shards/`` and return the names: staging folders (with their owner
    records) whose writer is provably dead (``kscale.store.staging``: never a live writer's, on any node),
    folders of the old naming (``.<shard>.tmp-<pid>``), and the temp files of markers
    (``.<shard>.done.json.tmp-<pid>-<tid>``: a writer killed between writing one and linking or unlinking it).
    Nothing a reader looks at. The extraction calls it with the store's lock held, before its writers start."""
    return sweep(store)


COMMIT_RACE_S = 3.0  # a marker-less shard folder younger than this may be another writer's commit in flight
# (the time between its rename into place and its marker: an fsync of shards/ and one small file; a writer
# held longer loses nothing: the extraction is deterministic and the later marker names the same bytes)


def _repaired_after(store: str | Path, name: str, folder_ctime: float) -> bool:
    """``kscale verify --repair`` moved the shard's marker aside (``sNNNNNN.damaged-<time>.json``; the rename
    sets its ctime) after the folder was last renamed or changed: the folder is the damaged one it un-committed,
    not another writer's commit in flight."""
    for m in (Path(store) / "shards").glob(f"{name}.damaged-*.json"):
        try:
            if m.stat().st_ctime >= folder_ctime:
                return True
        except FileNotFoundError:
            continue
    return False


class ShardWriter:
    def __init__(self, store: str | Path, shard_name: str, *, n_layers: int, n_heads: int, head_dim: int,
                 rope_rows: int, key_dtype: str, chunk_tokens: int, compress_keys: bool = False,
                 max_inflight: int = 2, vectors: tuple[str, ...] = ()):
        """``vectors``: the kinds written beside keys ("q", "v"; ``layout.VECTOR_KINDS``), each given to
        every ``append`` for the same rows as the keys."""
        self.store, self.name, self.dir = Path(store), shard_name, None
        self._refuse_committed()  # checked before anything is deleted
        fence(self.store)  # a run whose store lock was taken over writes nothing (kscale.output.fence)
        root = _root_attrs(self.store)  # read once: its version checked, its token fields used
        _check_root(self.store, root)
        # our own folder and owner record, with a heartbeat; dead writers' staging of this shard cleared
        self.staging = Staging(self.store, shard_name)
        weakref.finalize(self, let_die, self.staging.owner.token)  # an abandoned writer's heartbeat stops
        self.dir = self.staging.dir
        write_group_meta(self.dir, {"shard": shard_name})
        self.vectors = tuple(k for k in ("q", "v") if k in vectors)
        for kind in self.vectors:
            write_group_meta(self.dir / VECTOR_GROUPS[kind], {})
        self.pool: ThreadPoolExecutor | None = _take_write_thread()  # None once the writer is done
        self.inflight: deque[Future] = deque()
        self.max_inflight = max_inflight
        self.L, self.H, self.D, self.R = n_layers, n_heads, head_dim, rope_rows
        self.video = root.get("token_fields") == list(token_fields(rope_rows, video=True))
        self.key_dtype, self.chunk, self.compress_keys = key_dtype, chunk_tokens, compress_keys
        self.buffers: dict[str, _ModalityBuffer] = {}
        self.tables: dict[str, list[dict[str, np.ndarray]]] = {}
        self.bytes_written = 0
        self.vector_bytes = dict.fromkeys(self.vectors, 0)
        self.tokens = {m: 0 for m in MODALITIES}

    def _refuse_committed(self) -> None:
        if marker_path(self.store, self.name).exists():
            if getattr(self, "dir", None) is not None:
                self.staging.release(remove=True)  # our staging folder: nobody else reads it
            raise ShardCommitted(self.store, self.name)

    def _await_marker(self, final: Path, deadline: float) -> None:
        """Until ``deadline``, raise ``ShardCommitted`` (our staging removed) as soon as the shard's marker exists."""
        while time.monotonic() < deadline:
            self._refuse_committed()
            time.sleep(0.05)
        self._refuse_committed()

    def _clear_unmarked(self, final: Path) -> None:
        """Remove ``shards/<name>/`` that has no marker, unless it is another writer's commit in flight.

        Two writers of one shard can be live at once (a lost node's worker still running and its
        replacement). A folder renamed into place less than ``COMMIT_RACE_S`` ago (its ctime: a rename
        updates it) is taken to be another writer's, between its rename and its marker: wait for that
        marker and yield (``ShardCommitted``) rather than delete the data it is about to name. An older
        one is a killed run's: renamed aside first (one atomic step, so a folder renamed in after it is
        never touched), then deleted."""
        try:
            renamed_at = final.stat().st_ctime
        except FileNotFoundError:
            return
        if not _repaired_after(self.store, self.name, renamed_at):  # un-committed by repair: nobody's in flight
            self._await_marker(final, time.monotonic() + max(0.0, renamed_at + COMMIT_RACE_S - time.time()))
        aside = final.with_name(f".{self.name}.tmp-{self.staging.owner.tag}.unmarked")  # garbage to a sweep
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def submit(self, fn, *args) -> None:
        """Queue a write on the background thread; wait for the oldest beyond ``max_inflight``."""
        if self.pool is None:
            raise RuntimeError(f"shard {self.name}: the writer was committed or aborted")
        while len(self.inflight) >= self.max_inflight:
            self.inflight.popleft().result()  # re-raises a failed write here, before any commit marker
        self.inflight.append(self.pool.submit(fn, *args))

    def append(self, modality: str, keys_LNHD: np.ndarray, cols: dict[str, np.ndarray],
               vectors: dict[str, np.ndarray] | None = None) -> None:
        """Rows of one modality: keys (L, N, H, D), their token columns and, for each kind of ``self.vectors``,
        that kind's (L, N, H', D) vectors of the same rows."""
        if keys_LNHD.shape[1] == 0:
            return
        vectors = vectors or {}
        if sorted(vectors) != sorted(self.vectors):
            raise ValueError(f"shard {self.name}: append got vectors {sorted(vectors)}, the writer writes "
                             f"{sorted(self.vectors)}")
        buf = self.buffers.get(modality)
        if buf is None:
            buf = self.buffers[modality] = _ModalityBuffer(modality, self)
        self.tokens[modality] += keys_LNHD.shape[1]
        self.bytes_written += keys_LNHD.nbytes
        for kind, v in vectors.items():
            assert v.shape[1] == keys_LNHD.shape[1], (kind, v.shape, keys_LNHD.shape)
            self.vector_bytes[kind] += v.nbytes
        buf.append({"k": keys_LNHD.astype(self.key_dtype, copy=False),
                    **{kind: v.astype(self.key_dtype, copy=False) for kind, v in vectors.items()}},
                   token_table(cols, self.R, self.video))

    def append_table(self, name: str, cols: dict[str, np.ndarray]) -> None:
        """Add rows to a per-shard side table (e.g. per-sample attention statistics), written at commit."""
        if cols and len(next(iter(cols.values()))):
            self.tables.setdefault(name, []).append({k: np.asarray(v) for k, v in cols.items()})

    def _write_tables(self) -> None:
        for name, parts in self.tables.items():
            g = zarr.open_group(str(self.dir), mode="r+").require_group(name)
            for k in parts[0]:
                v = np.concatenate([p[k] for p in parts])
                g.create_array(k, data=v, chunks=(max(len(v), 1), *v.shape[1:]),
                               compressors=[ZstdCodec(level=0), Crc32cCodec()],
                               config={"write_empty_chunks": True})  # every chunk a file: a missing one is damage

    def _files(self) -> tuple[dict[str, int], dict[str, str]]:
        """Every file of the staging folder with its size, and the crc32c of each metadata file
        (``zarr.json``: chunk files carry their own crc32c, metadata has none; read back from disk, so the
        marker names what is there). Then every file and every folder is fsynced: the marker must never
        point at data that a power loss could still take back."""
        sizes, sums = {}, {}
        files, folders = [], []
        top = str(self.dir)
        stack = [(top, "")]
        while stack:  # os.walk's listing, without its Path objects
            path, rel = stack.pop()
            folders.append(path)
            with os.scandir(path) as it:
                for e in it:
                    r = f"{rel}{e.name}"
                    if e.is_dir(follow_symlinks=False):
                        stack.append((e.path, f"{r}/"))
                        continue
                    sizes[r] = e.stat().st_size
                    if e.name == "zarr.json":
                        sums[r] = file_crc32c(e.path)
                    files.append(e.path)
        # In parallel: concurrent fsyncs share the filesystem's journal commits (one at a time cost ~4 ms
        # each on this machine's disk, ~80 per shard); every file's fsync, then every folder's, finish
        # before the rename.
        pool = fsync_pool()
        for paths in (files, folders):
            done = [pool.submit(fsync_path, Path(p)) for p in paths]
            wait(done)  # all of them, even when one failed: nothing still touches the folder after a failure
            for f in done:
                f.result()
        return dict(sorted(sizes.items())), dict(sorted(sums.items()))

    def commit(self, stats: dict, errors: list[dict]) -> dict:
        """Finish the writes, publish the shard under its name and create its marker; return the marker.
        Either way the writer is done: its heartbeat stops, and a failed commit removes its staging folder."""
        try:
            marker = self._publish(stats, errors)
        except BaseException:
            self.staging.release(remove=True)
            raise
        self.staging.release(remove=False)  # the folder is the shard now; its owner record goes
        return marker

    def abort(self) -> None:
        """Give the shard up: wait for queued writes, stop the heartbeat, remove the staging folder."""
        self._close_writes()
        self.staging.release(remove=True)

    def _close_writes(self) -> None:
        """Wait for every queued write (failed ones too), then hand the writer thread on; idempotent."""
        if self.pool is None:
            return
        wait(self.inflight)
        self.inflight.clear()
        pool, self.pool = self.pool, None
        _give_back_write_thread(pool)

    def _publish(self, stats: dict, errors: list[dict]) -> dict:
        try:
            for buf in self.buffers.values():
                buf.flush(final=True)
            while self.inflight:
                self.inflight.popleft().result()
            self._write_tables()
        finally:
            self._close_writes()
        files, checksums = self._files()  # fsyncs every file and folder of the shard
        marker = {**stats, "tokens": self.tokens, "key_bytes": self.bytes_written, "errors": errors,
                  **({"vector_bytes": self.vector_bytes} if self.vectors else {}), "layout": SHARD_LAYOUT, "chunk_tokens": self.chunk, "files": files, "meta_crc32c": checksums,
                  "groups": sorted({f.split("/", 1)[0] for f in files if "/" in f})}
        final = shard_dir(self.store, self.name)
        fence(self.store)  # the lock is still ours: nothing is published beside the run that took it over
        self._refuse_committed()
        if final.exists():  # a killed run's partial shard, one un-committed by verify --repair, or a commit in flight
            self._clear_unmarked(final)
        self._refuse_committed()
        self.staging.check_ours()  # StagingLost if another process judged us dead and removed our folder
        try:
            os.rename(self.dir, final)
        except OSError:  # another writer's folder took the name since we cleared it: its marker follows
            self._await_marker(final, time.monotonic() + COMMIT_RACE_S)
            raise
        fsync_path(final.parent)  # the rename is durable before the marker names the shard
        if not create_json_exclusive(marker_path(self.store, self.name), marker):
            raise ShardCommitted(self.store, self.name)  # committed during this commit: `kscale verify` it
        return marker
