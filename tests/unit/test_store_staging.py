"""Staging folders of shard writers on a store several nodes write (kscale/store/staging.py): a live writer's
folder is never deleted (this process, another process), a dead one's is (killed by PID, abandoned, another
host's with a stale heartbeat), two writers never share a folder (same pid on two hosts), a writer judged dead
refuses to commit, and the old naming (``.<shard>.tmp-<pid>``) is swept as before."""

import dataclasses
import gc
import json
import multiprocessing as mp
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import kscale.store
from kscale.cli import main
from kscale.store import staging
from kscale.store.layout import marker_path, shard_dir
from kscale.store.verify import verify_store
from kscale.store.writer import ShardCommitted, ShardWriter, StagingLost, sweep_staging
from tests.unit.test_store_v2 import D, H, L, R, make_store, shard_data

S = 1  # make_store(n_shards=1) commits s000000; the writers here write s000001


def _writer(store, s: int = S) -> ShardWriter:
    return ShardWriter(store, f"s{s:06d}", n_layers=L, n_heads=H, head_dim=D, rope_rows=R, key_dtype="float16",
                       chunk_tokens=4)


def _append(w: ShardWriter, s: int, half: int) -> None:
    """One half of shard ``s``'s rows (the rows ``tests.unit.test_store_v2.write_shard`` writes)."""
    for modality, n in (("text", 5 + s % 3), ("image", 9 + 2 * s)):
        part = np.array_split(np.arange(n), 2)[half]
        k, cols = shard_data(s, modality, n)
        w.append(modality, k[:, part], {c: v[part] for c, v in cols.items()})


def _commit(w: ShardWriter, s: int = S) -> dict:
    return w.commit({"shard": f"s{s:06d}", "start": 3 * s, "stop": 3 * s + 3, "n_samples": 3, "n_samples_ok": 3,
                     "n_errors": 0}, [])


def _staging(store) -> list[str]:
    return sorted(p.name for p in Path(store, "shards").glob(".s*.tmp-*"))


def _whole(store, tmp_path) -> None:
    """The store verifies and holds exactly what an undisturbed writer writes (keys and tokens)."""
    assert verify_store(store) == []
    ref = make_store(tmp_path / "ref", n_shards=2)
    got, want = kscale.store.open(store), kscale.store.open(ref)
    assert sorted(got.shards) == sorted(want.shards)
    for m in ("text", "image"):
        for layer in got.layers:
            a, b = got.keys(layer, m).compute(), want.keys(layer, m).compute()
            assert a.dtype == b.dtype and np.array_equal(a, b), (m, layer)
        for c, v in want.tokens(m).items():
            assert np.array_equal(got.tokens(m)[c], v), (m, c)
    assert not _staging(store), "nothing of a staging folder is left"


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------- live writers are kept


def test_a_second_writer_in_this_process_keeps_the_first_ones_staging_and_one_commit_wins(tmp_path):
    store = make_store(tmp_path / "s", n_shards=1)
    a = _writer(store)
    _append(a, S, 0)
    while a.inflight:  # the first half's whole chunks are on disk
        a.inflight.popleft().result()
    before = _files(a.dir)
    b = _writer(store)  # a retry of the shard while the first attempt runs
    assert a.dir != b.dir and a.dir.is_dir() and _files(a.dir) == before, "the live writer's staging was touched"
    sweep_staging(store)  # a sweep leaves both alone too
    assert a.dir.is_dir() and b.dir.is_dir() and _files(a.dir) == before
    _append(b, S, 0)
    for w in (a, b):
        _append(w, S, 1)
    _commit(a)
    with pytest.raises(ShardCommitted):
        _commit(b)
    _whole(store, tmp_path)


def _child(store: str, shards: list[int], ready, go, out) -> None:
    """In another process: open writers of ``shards``, write half of each, report their folders; on ``go``
    finish and commit the first, report how that went, and idle (until killed)."""
    writers = [_writer(store, s) for s in shards]
    for w, s in zip(writers, shards):
        _append(w, s, 0)
        while w.inflight:
            w.inflight.popleft().result()
    ready.put([str(w.dir) for w in writers])
    if go.wait(120):
        _append(writers[0], shards[0], 1)
        try:
            _commit(writers[0], shards[0])
            out.put("committed")
        except Exception as e:  # noqa: BLE001 - reported to the test
            out.put(f"{type(e).__name__}: {e}")
    time.sleep(120)


def _start_child(store, shards):
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_child, args=(str(store), shards, ready, go, out), daemon=True)
    proc.start()
    return proc, [Path(d) for d in ready.get(timeout=120)], go, out


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)


def test_a_writer_alive_in_another_process_keeps_its_staging_and_its_commit_wins(tmp_path):
    store = make_store(tmp_path / "s", n_shards=1)
    proc, (theirs,), go, out = _start_child(store, [S])
    try:
        before = _files(theirs)
        mine = _writer(store)  # e.g. the replacement of a worker presumed lost
        sweep_staging(store)  # e.g. a new run while the old run's worker is a zombie
        assert theirs.is_dir() and _files(theirs) == before, "a live writer's staging was deleted"
        _append(mine, S, 0)
        _append(mine, S, 1)
        go.set()
        assert out.get(timeout=120) == "committed"
        with pytest.raises(ShardCommitted):
            _commit(mine)
        _whole(store, tmp_path)
    finally:
        _kill(proc)


# --------------------------------------------------------------------------------------- dead writers are removed


def test_a_killed_writers_staging_is_removed_by_the_shards_next_writer_and_by_the_sweep(tmp_path):
    store = make_store(tmp_path / "s", n_shards=1)
    proc, (one, two), _, _ = _start_child(store, [S, 2])
    _kill(proc)
    assert one.is_dir() and two.is_dir()
    w = _writer(store, S)
    assert not one.exists() and not Path(f"{one}.owner").exists(), "the dead writer's staging of s000001 stays"
    assert two.is_dir(), "a writer clears only its own shard's staging"
    assert [n for n in sweep_staging(store) if n.startswith(".s000002")] == [two.name, f"{two.name}.owner"]
    assert not two.exists() and w.dir.is_dir()
    _append(w, S, 0)
    _append(w, S, 1)
    _commit(w)
    _whole(store, tmp_path)


def test_an_abandoned_writer_in_this_process_is_dead_once_collected(tmp_path):
    store = make_store(tmp_path / "s", n_shards=1)
    a = _writer(store)
    _append(a, S, 0)
    gone = a.dir
    a.pool.shutdown(wait=True)  # a writer is alive while its pool writes (the pool's work items hold it)
    del a  # a shard attempt that failed: nobody holds its writer
    gc.collect()
    b = _writer(store)
    assert not gone.exists(), "an abandoned writer's staging is kept"
    c = _writer(store, 2)
    c.abort()  # a writer that gives up removes its own folder and record
    assert not c.dir.exists() and not c.staging.record.exists()
    _append(b, S, 0)
    _append(b, S, 1)
    _commit(b)
    _whole(store, tmp_path)


def _foreign(store, shard: str, *, host: str, machine: str, pid: int, age_s: float, pid_start: str = "12345") -> Path:
    """A staging folder and owner record as another writer makes them, its heartbeat ``age_s`` old."""
    owner = staging.Owner(host, machine, pid, pid_start, secrets.token_hex(8))
    folder = Path(store) / "shards" / f".{shard}.tmp-{owner.tag}"
    (folder / "image" / "keys").mkdir(parents=True)
    (folder / "image" / "keys" / "c.0.0.0.0").write_bytes(b"partial")
    record = Path(f"{folder}.owner")
    record.write_text(json.dumps(dataclasses.asdict(owner)))
    t = time.time() - age_s
    os.utime(record, (t, t))
    return folder


def test_another_hosts_staging_is_removed_only_when_its_heartbeat_is_stale(tmp_path):
    store = make_store(tmp_path / "s", n_shards=1)
    kw = dict(host="node-b", machine="b0e-boot/pid:[4026531836]", pid=os.getpid())  # our pid, another machine
    stale = _foreign(store, "s000001", **kw, age_s=staging.STALE_S + 30)
    fresh = _foreign(store, "s000001", **kw, age_s=staging.STALE_S - 30)
    # a container on another machine that shares our host name: pids there are not ours to check
    twin = _foreign(store, "s000002", host=socket.gethostname(), machine="other-boot/pid:[1]", pid=2 ** 22 + 7,
                    age_s=1)
    w = _writer(store)
    assert not stale.exists() and not Path(f"{stale}.owner").exists(), "a stale heartbeat's staging stays"
    assert fresh.is_dir() and Path(f"{fresh}.owner").is_file(), "a live heartbeat's staging was deleted"
    sweep_staging(store)
    assert fresh.is_dir() and twin.is_dir(), "the sweep deleted a live writer's staging"
    os.utime(Path(f"{twin}.owner"), (time.time() - staging.STALE_S - 5,) * 2)
    assert sweep_staging(store) == [twin.name, f"{twin.name}.owner"]
    _append(w, S, 0)
    _append(w, S, 1)
    _commit(w)
    fresh_record = Path(f"{fresh}.owner")
    os.utime(fresh_record, (time.time() - staging.STALE_S - 5,) * 2)  # its writer died meanwhile
    sweep_staging(store)
    _whole(store, tmp_path)


def test_a_reused_pid_on_this_machine_is_a_dead_writer(tmp_path):
    """Same machine: a live pid with another start time is another process (the writer died, its pid was
    reused); with the recorded start time it is the writer, alive (a fresh heartbeat) and kept."""
    store = make_store(tmp_path / "s", n_shards=1)
    pid = os.getppid()  # a live process that is not this one
    here = dict(host=socket.gethostname(), machine=staging._machine(), pid=pid, age_s=1)
    reused = _foreign(store, "s000001", **here, pid_start="1")
    alive = _foreign(store, "s000001", **here, pid_start=staging._proc_start(pid))
    w = _writer(store)
    assert not reused.exists(), "a reused pid's staging stays"
    assert alive.is_dir(), "a live process's staging was deleted"
    w.abort()
    record = Path(f"{alive}.owner")
    os.utime(record, (time.time() - staging.STALE_S - 5,) * 2)  # alive, but its writer stopped beating
    assert sweep_staging(store) == [alive.name, record.name]


# --------------------------------------------------------------------------------------- names, commit, old stores


def test_two_writers_of_one_pid_on_two_hosts_never_share_a_folder(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", n_shards=1)
    monkeypatch.setattr(staging.socket, "gethostname", lambda: "node-a")
    a = _writer(store)
    _append(a, S, 0)
    monkeypatch.setattr(staging.socket, "gethostname", lambda: "node-b")
    b = _writer(store)  # same pid, another host name
    assert a.staging.owner.pid == b.staging.owner.pid
    assert a.dir != b.dir and a.dir.is_dir() and b.dir.is_dir()
    assert f"node_a-{os.getpid()}-" in a.dir.name and f"node_b-{os.getpid()}-" in b.dir.name
    _append(b, S, 0)
    for w in (b, a):
        _append(w, S, 1)
    _commit(b)
    with pytest.raises(ShardCommitted):
        _commit(a)
    _whole(store, tmp_path)


def test_a_writer_judged_dead_refuses_to_commit(tmp_path):
    """A writer paused past the heartbeat bound was judged dead and its folder removed; it then resumes: its
    later writes recreate part of the folder, and the commit refuses rather than publish that part."""
    store = make_store(tmp_path / "s", n_shards=1)
    w = _writer(store)
    _append(w, S, 0)
    while w.inflight:
        w.inflight.popleft().result()
    staging.let_die(w.staging.owner.token)  # as another process sees a writer without heartbeat
    assert sweep_staging(store) == [w.dir.name, f"{w.dir.name}.owner"]
    _append(w, S, 1)
    with pytest.raises(StagingLost, match="removed by another process"):
        _commit(w)
    assert not marker_path(store, "s000001").exists() and not shard_dir(store, "s000001").exists()
    assert not _staging(store)
    retry = _writer(store)
    _append(retry, S, 0)
    _append(retry, S, 1)
    _commit(retry)
    _whole(store, tmp_path)


def test_old_staging_names_are_swept_as_before_and_verify_ignores_them(tmp_path):
    """Stores written before owner records: ``.<shard>.tmp-<pid>`` (even of a live pid: there is no record to
    judge by) and marker temp files are removed by the sweep and by the shard's next writer, as before."""
    store = make_store(tmp_path / "s", n_shards=1)
    shards = Path(store) / "shards"
    old = [shards / f".s000001.tmp-{os.getpid()}", shards / ".s000002.tmp-99999",
           shards / ".s000003.tmp-77-unmarked"]
    for d in old:
        (d / "image" / "keys").mkdir(parents=True)
        (d / "image" / "keys" / "c.0.0.0.0").write_bytes(b"partial")
    (shards / ".s000000.done.json.tmp-424242-1").write_text("{}")
    assert verify_store(store) == [] and list(kscale.store.open(store).shards) == ["s000000"]
    res = CliRunner().invoke(main, ["verify", store])
    assert res.exit_code == 0, res.output
    w = _writer(store)  # resume: the shard's next writer clears its shard's old staging
    assert not old[0].exists() and old[1].exists()
    assert sorted(sweep_staging(store)) == sorted([".s000000.done.json.tmp-424242-1", old[1].name, old[2].name])
    assert w.dir.is_dir(), "the sweep deleted a live writer's staging"
    _append(w, S, 0)
    _append(w, S, 1)
    _commit(w)
    _whole(store, tmp_path)
