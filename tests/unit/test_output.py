"""The one output policy (kscale.output): one writer per output, stale locks, foreign folders, atomic
creation and overwrite. Each test reproduces a failure of issue 11 against the real filesystem."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zarr

from kscale.output import (ForeignOutput, OutputExists, OutputLock, OutputLocked, claim_output,
                           create_json_exclusive, write_json_atomic)

REPO = Path(__file__).resolve().parents[2]


def _store_kind():
    from kscale.extract.run import STORE_KIND

    return STORE_KIND


def _make_store(attrs: dict):
    def create(tmp: Path) -> None:
        zarr.open_group(str(tmp), mode="w").attrs.update(attrs)
        (tmp / "shards").mkdir()

    return create


STORE_ATTRS = {"format": "kscale-keys", "spec_fingerprint": "fp1"}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(lock: OutputLock, host: str, pid: int) -> None:
    lock.path.write_text(json.dumps({"user": "someone", "host": host, "pid": pid, "started_at": "earlier",
                                     "token": "t0ken", "pid_start": None}))


# ----------------------------------------------------------------------------- one writer


HOLDER = textwrap.dedent("""
    import sys, time
    from kscale.output import OutputLock
    with OutputLock(sys.argv[1]).held():
        print("HELD", flush=True)
        time.sleep(60)
""")


def test_second_run_on_one_output_is_refused_naming_the_holder(tmp_path) -> None:
    out = tmp_path / "keys"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(OutputLocked, match=rf"pid {holder.pid} .*lock"):
            with claim_output(out, "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
                pass
        assert not out.exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale (same host, dead pid) and the next run proceeds
    with claim_output(out, "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)) as p:
        assert (p / "zarr.json").is_file()
    assert not OutputLock(out).path.exists()  # released at the end


def test_two_claims_in_one_process_and_release(tmp_path) -> None:
    a, b = OutputLock(tmp_path / "x"), OutputLock(tmp_path / "x")
    with a.held() as me:
        with pytest.raises(OutputLocked, match=f"{me.user}@{socket.gethostname()} pid {os.getpid()}"):
            b.acquire()
    with b.held():  # released: free again
        pass


def test_stale_lock_of_a_dead_pid_is_taken_over_a_live_one_is_not(tmp_path) -> None:
    lock = OutputLock(tmp_path / "out")
    _write_lock(lock, socket.gethostname(), _dead_pid())
    with lock.held() as me:
        assert json.loads(lock.path.read_text())["token"] == me.token
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(lock, socket.gethostname(), sleeper.pid)
        with pytest.raises(OutputLocked, match=f"someone@{socket.gethostname()} pid {sleeper.pid}"):
            lock.acquire()
        assert json.loads(lock.path.read_text())["token"] == "t0ken"  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_other_host_lock_is_stale_only_after_the_heartbeat_timeout(tmp_path) -> None:
    lock = OutputLock(tmp_path / "out", stale_after_s=60)
    _write_lock(lock, "another-node", 1)
    with pytest.raises(OutputLocked, match="someone@another-node"):
        lock.acquire()  # fresh mtime: its holder may be alive; never stolen
    old = time.time() - 120
    os.utime(lock.path, (old, old))
    with lock.held():
        pass


def test_holder_refreshes_the_lock_mtime(tmp_path) -> None:
    lock = OutputLock(tmp_path / "out", heartbeat_s=0.05)
    with lock.held():
        old = time.time() - 100
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5


def test_exclusive_creation_never_replaces(tmp_path) -> None:
    p = tmp_path / "m.json"
    assert create_json_exclusive(p, {"a": 1})
    assert not create_json_exclusive(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    write_json_atomic(p, {"a": 3})
    assert json.loads(p.read_text()) == {"a": 3} and [f.name for f in tmp_path.iterdir()] == ["m.json"]


# ----------------------------------------------------------------------------- kinds, creation, overwrite


def test_foreign_folder_is_never_written_into_or_deleted(tmp_path) -> None:
    foreign = tmp_path / "mine"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "thesis.tex").write_text("precious")
    for mode in ("resume", "overwrite", "fail"):
        with pytest.raises(ForeignOutput, match="not a kscale store"):
            with claim_output(foreign, mode, _store_kind(), "fp1", _make_store(STORE_ATTRS)):
                pass
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoints", "thesis.tex"]


def test_fail_and_resume_of_another_spec_refuse(tmp_path) -> None:
    out = tmp_path / "keys"
    with claim_output(out, "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
        pass
    with pytest.raises(OutputExists, match="'fail'"):
        with claim_output(out, "fail", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
            pass
    with pytest.raises(OutputExists, match="different spec"):
        with claim_output(out, "resume", _store_kind(), "fp2", _make_store(STORE_ATTRS)):
            pass


def test_overwrite_keeps_nothing_of_the_old_store(tmp_path) -> None:
    out = tmp_path / "keys"
    with claim_output(out, "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
        (out / "shards" / "s000000").mkdir()
        (out / "shards" / "s000000.done.json").write_text("{}")
        (out / "_progress.json").write_text("{}")
    new = {"format": "kscale-keys", "spec_fingerprint": "fp2"}
    with claim_output(out, "overwrite", _store_kind(), "fp2", _make_store(new)):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["shards", "zarr.json"] and not any((out / "shards").iterdir())
    assert dict(zarr.open_group(str(out), mode="r").attrs) == new
    assert [p.name for p in tmp_path.iterdir()] == ["keys"]  # no temp or old copy left beside it


def test_leftover_of_an_interrupted_creation_is_garbage(tmp_path) -> None:
    out = tmp_path / "keys"
    half = tmp_path / ".keys.tmp-424242"  # what a kill during creation leaves: zarr.json without attributes
    zarr.open_group(str(half), mode="w")
    old = tmp_path / ".keys.tmp-old-424243"  # ... or during an overwrite, the old store moved aside
    old.mkdir()
    neighbour = tmp_path / ".keys.tmp-x.tmp-77"  # garbage of another output ("keys.tmp-x"): not ours to judge
    neighbour.mkdir()
    with claim_output(out, "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keys.tmp-x.tmp-77", "keys"]
    assert dict(zarr.open_group(str(out), mode="r").attrs) == STORE_ATTRS


CREATOR = textwrap.dedent("""
    import sys, time, zarr
    from pathlib import Path
    from kscale.extract.run import STORE_KIND
    from kscale.output import claim_output

    def create(tmp):
        zarr.open_group(str(tmp), mode="w")  # root zarr.json, attributes not yet written
        print("CREATING", flush=True)
        time.sleep(60)

    with claim_output(sys.argv[1], "overwrite", STORE_KIND, "fp1", create):
        pass
""")


def test_sigkill_during_creation_leaves_nothing_later_runs_refuse(tmp_path) -> None:
    out = tmp_path / "keys"
    proc = subprocess.Popen([sys.executable, "-c", CREATOR, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "CREATING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # the half-made store is only in the temp sibling
    with claim_output(out, "fail", _store_kind(), "fp1", _make_store(STORE_ATTRS)):  # even 'fail' proceeds
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]  # lock taken over, garbage gone
    assert dict(zarr.open_group(str(out), mode="r").attrs) == STORE_ATTRS


# ----------------------------------------------------------------------------- every stage claims its own kind


def _train_spec(out: Path, if_exists: str):
    from kscale.spec import spec_from_dict

    return spec_from_dict({"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {"source": "generated"},
                           "output": {"path": str(out), "if_exists": if_exists}})


def test_train_overwrite_refuses_a_folder_that_is_not_a_train_run(tmp_path) -> None:
    from kscale.train.run import claim_run_dir

    foreign = tmp_path / "experiments"
    (foreign / "checkpoints").mkdir(parents=True)  # what used to be enough to be deleted
    (foreign / "notes.md").write_text("months of work")
    with pytest.raises(ForeignOutput, match="not a kscale train run"):
        with claim_run_dir(_train_spec(foreign, "overwrite")):
            pass
    assert (foreign / "notes.md").read_text() == "months of work" and (foreign / "checkpoints").is_dir()
    run = tmp_path / "run"
    with claim_run_dir(_train_spec(run, "overwrite")):
        (run / "checkpoints").mkdir()
    with claim_run_dir(_train_spec(run, "overwrite")):  # its own kind: started over
        assert sorted(p.name for p in run.iterdir()) == ["kscale.json"]


def test_analyze_refuses_to_write_into_a_foreign_folder(tmp_path) -> None:
    from kscale.analysis.run import run_analyze
    from kscale.spec import spec_from_dict

    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "results.csv").write_text("mine")
    from kscale.store.layout import STORE_FORMAT

    (tmp_path / "store").mkdir()  # validation checks that the input store is one (its root marker)
    (tmp_path / "store" / "zarr.json").write_text(json.dumps({"attributes": {"format": STORE_FORMAT}}))
    for mode in ("resume", "overwrite"):
        spec = spec_from_dict({"kind": "analyze", "analyze": {"stores": [str(tmp_path / "store")]},
                               "output": {"path": str(foreign), "if_exists": mode}}, check_model=False)
        with pytest.raises(ForeignOutput, match="not a kscale analysis run"):
            run_analyze(spec)
    assert [p.name for p in foreign.iterdir()] == ["results.csv"] and (foreign / "results.csv").read_text() == "mine"


# ----------------------------------------------------------------------------- a committed shard is never rewritten


def _writer(store: Path):
    from kscale.store.writer import ShardWriter

    return ShardWriter(store, "s000000", n_layers=1, n_heads=1, head_dim=2, rope_rows=1, key_dtype="float32",
                       chunk_tokens=4)


def test_shard_with_a_marker_is_never_deleted_or_recommitted(tmp_path) -> None:
    import numpy as np

    from kscale.store.layout import marker_path, shard_dir
    from kscale.store.writer import ShardCommitted

    store = tmp_path / "store"
    (store / "shards").mkdir(parents=True)
    w = _writer(store)  # a writer that started before the shard was committed elsewhere ...
    w.append("text", np.ones((1, 3, 1, 2), np.float32), {"sample_id": np.zeros(3), "position": np.arange(3),
                                                        "rope_pos": np.zeros((3, 1)), "token_id": np.zeros(3),
                                                        "image_index": -np.ones(3)})
    marker_path(store, "s000000").write_text(json.dumps({"n_samples_ok": 7}))  # ... committed meanwhile
    with pytest.raises(ShardCommitted, match="s000000 .* committed"):
        w.commit({"n_samples_ok": 1}, [])
    assert json.loads(marker_path(store, "s000000").read_text()) == {"n_samples_ok": 7}
    shard_dir(store, "s000000").mkdir(exist_ok=True)  # store format 2: the writer wrote a staging folder
    (shard_dir(store, "s000000") / "kept").write_text("committed data")
    with pytest.raises(ShardCommitted) as e:
        _writer(store)  # checked right before it would delete the shard's folder
    assert e.value.marker == {"n_samples_ok": 7} and (shard_dir(store, "s000000") / "kept").is_file()


def test_cli_refuses_a_locked_output_with_a_named_error(tmp_path) -> None:
    import yaml

    from tests.conftest import extract_spec

    spec = extract_spec(tmp_path)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    with OutputLock(Path(spec["output"]["path"])).held():
        p = subprocess.run([sys.executable, "-m", "kscale.cli", "submit", str(tmp_path / "job.yaml"), "--no-progress"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"OutputLocked: output.path: {spec['output']['path']!r} is being written by another run" in p.stderr
    assert f"pid {os.getpid()}" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- issue 21: locks under attack


def _lock_json(lock: OutputLock) -> dict:
    return json.loads(lock.path.read_text())


def _holder(token: str, host: str = "elsewhere", pid: int = 1, pid_start: str | None = None) -> dict:
    return {"user": "u", "host": host, "pid": pid, "started_at": "t", "token": token, "pid_start": pid_start}


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path) -> None:
    """A holder whose lock was taken over must not delete the new holder's lock on release."""
    lock = OutputLock(tmp_path / "out")
    lock.acquire()
    write_json_atomic(lock.path, _holder("new-holder"))  # taken over meanwhile
    lock.release()
    assert _lock_json(lock)["token"] == "new-holder"


def test_a_reused_pid_is_not_a_live_holder(tmp_path) -> None:
    """Same host, the pid alive, but a different process (its start time differs): the lock is stale."""
    from kscale.output import _pid_start

    lock = OutputLock(tmp_path / "out")
    here = socket.gethostname()
    write_json_atomic(lock.path, _holder("reused", here, os.getpid(), pid_start="1"))  # pid alive, started at tick 1
    with lock.held() as me:
        assert _lock_json(lock)["token"] == me.token
    write_json_atomic(lock.path, _holder("same", here, os.getpid(), pid_start=_pid_start(os.getpid())))
    with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):  # the very process: alive, never taken over
        lock.acquire()
    assert _lock_json(lock)["token"] == "same"


def test_break_never_drops_a_live_lock_even_when_a_third_run_creates_one(tmp_path, monkeypatch) -> None:
    """We judged a lock stale; before our rename a live run C replaced it, and in the moment between our
    rename and the put-back a third run D created the lock. C's lock must come back (D meets another token
    at its first fence); before, the put-back failed on D's file and C's lock was deleted."""
    from kscale import output

    lock = OutputLock(tmp_path / "out")
    _write_lock(lock, socket.gethostname(), _dead_pid())
    stale = lock.read()
    write_json_atomic(lock.path, _holder("c-live"))  # C took over the stale lock first
    real = output.read_json

    def third_run_creates(path: Path):
        data = real(path)
        if ".stale-" in path.name:  # we hold C's lock aside: the path is free for a moment
            assert create_json_exclusive(lock.path, _holder("d-new"))
        return data

    monkeypatch.setattr(output, "read_json", third_run_creates)
    lock._break(stale)
    monkeypatch.undo()
    assert _lock_json(lock)["token"] == "c-live"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # nothing left aside


def test_the_lock_names_the_numeric_uid_without_a_passwd_entry(tmp_path, monkeypatch) -> None:
    """OpenShift-style pods: an arbitrary uid, no passwd entry, no USER: getpass.getuser() raises."""
    import getpass
    import pwd

    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises((KeyError, OSError)):
        getpass.getuser()  # the failure this guards against
    with claim_output(tmp_path / "keys", "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
        assert _lock_json(OutputLock(tmp_path / "keys"))["user"] == str(os.getuid())


TAKEOVER = textwrap.dedent("""
    import socket, sys
    socket.gethostname = lambda: "node-b"  # another node, which sees the paused holder's heartbeat age
    from kscale.output import OutputLock
    lock = OutputLock(sys.argv[1], stale_after_s=60)
    print(lock.acquire().token, flush=True)  # and keeps it (exits without releasing)
""")


def test_a_holder_whose_lock_was_taken_over_writes_nothing_more(tmp_path) -> None:
    """A holder paused past the takeover time (its heartbeat older than stale_after_s) and taken over from
    another node stops before its next write: the writer, the commit and the index all raise LockLost."""
    import numpy as np

    from kscale.output import LockLost
    from kscale.store.index import write_index
    from kscale.store.layout import INDEX_FILE, marker_path, shard_dir

    store = tmp_path / "store"
    (store / "shards").mkdir(parents=True)
    lock = OutputLock(store, heartbeat_s=3600)
    with lock.held():
        w = _writer(store)  # started before the pause
        w.append("text", np.ones((1, 3, 1, 2), np.float32), {
            "sample_id": np.zeros(3), "position": np.arange(3), "rope_pos": np.zeros((3, 1)),
            "token_id": np.zeros(3), "image_index": -np.ones(3)})
        old = time.time() - 120  # paused: no heartbeat for two minutes
        os.utime(lock.path, (old, old))
        b = subprocess.run([sys.executable, "-c", TAKEOVER, str(store)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
        assert b.returncode == 0, b.stderr
        new_token = b.stdout.strip()
        with pytest.raises(LockLost, match="taken over"):
            w.commit({"n_samples_ok": 1}, [])
        assert not marker_path(store, "s000000").exists() and not shard_dir(store, "s000000").exists()
        with pytest.raises(LockLost):
            _writer(store)
        with pytest.raises(LockLost):
            write_index(store)
        assert not (store / INDEX_FILE).exists()
    assert _lock_json(lock)["token"] == new_token  # and our release left the new holder's lock


def test_the_local_executor_stops_on_a_lost_lock_instead_of_quarantining(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from kscale.data.records import Shard
    from kscale.executors.local import LocalExecutor
    from kscale.output import LockLost

    (tmp_path / "lost_stage.py").write_text(textwrap.dedent("""
        from kscale.output import LockLost
        calls = []
        def setup(spec):
            return None
        def run_shard(spec, shard, state):
            calls.append(shard.name)
            raise LockLost("taken over")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = SimpleNamespace(name="j", kind="extract", resources=SimpleNamespace(max_retries=2))
    with pytest.raises(LockLost):
        LocalExecutor("lost_stage", show_bar=False).run(spec, [Shard(0, 0, 1), Shard(1, 1, 2)], 0, str(tmp_path))
    import lost_stage

    assert lost_stage.calls == ["s000000", "s000001"]  # nothing retried (shard 1 starts while 0 commits)


def _shard_files(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _old_store(out: Path) -> dict:
    with claim_output(out, "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
        (out / "shards" / "s000000").mkdir()
        (out / "shards" / "s000000" / "data").write_text("precious")
        (out / "shards" / "s000000.done.json").write_text("{}")
    return _shard_files(out)


def test_a_failed_overwrite_keeps_the_old_output(tmp_path, monkeypatch) -> None:
    out = tmp_path / "keys"
    before = _old_store(out)

    def fails(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        with claim_output(out, "overwrite", _store_kind(), "fp2", fails):
            pass
    assert _shard_files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["keys"]
    from kscale import output

    real = os.rename

    def swap_fails(src, dst):  # the new output is built; moving it into place fails
        if Path(src).name.startswith(".keys.tmp-") and "old-" not in Path(src).name:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(output.os, "rename", swap_fails)
    with pytest.raises(OSError, match="Input/output"):
        with claim_output(out, "overwrite", _store_kind(), "fp2", _make_store({**STORE_ATTRS, "spec_fingerprint": "fp2"})):
            pass
    monkeypatch.undo()
    assert _shard_files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["keys"]


def test_an_overwrite_killed_between_its_renames_leaves_the_old_output_to_the_next_run(tmp_path) -> None:
    out = tmp_path / "keys"
    before = _old_store(out)
    os.rename(out, tmp_path / ".keys.tmp-old-424242")  # the old output moved aside, then SIGKILL
    zarr.open_group(str(tmp_path / ".keys.tmp-424242"), mode="w")  # the new one, built, never moved in
    with claim_output(out, "resume", _store_kind(), "fp1", _make_store(STORE_ATTRS)):
        pass
    assert _shard_files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["keys"]


def test_verify_repair_and_info_reindex_take_the_store_lock(tmp_path) -> None:
    from click.testing import CliRunner

    from kscale.cli import main
    from kscale.store.layout import INDEX_FILE, marker_path, shard_dir
    from tests.unit.test_store_v2 import make_store

    path = make_store(tmp_path / "s")
    chunk = shard_dir(path, "s000001") / "image" / "keys" / "c.0.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-1])  # damage: a truncated chunk of shard 1
    (tmp_path / "s" / INDEX_FILE).unlink(missing_ok=True)
    with OutputLock(path).held():  # a run is writing this store
        for args in (["verify", path, "--repair"], ["info", "--reindex", path]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2 and "being written by another run" in res.output, (args, res.output)
        assert marker_path(path, "s000001").exists() and not (tmp_path / "s" / INDEX_FILE).exists()
        assert CliRunner().invoke(main, ["verify", path]).exit_code == 1  # reading needs no lock
    res = CliRunner().invoke(main, ["verify", path, "--repair"])
    assert res.exit_code == 1 and "un-committed 1" in res.output and not marker_path(path, "s000001").exists()
    assert CliRunner().invoke(main, ["info", "--reindex", path]).exit_code == 0
    assert (tmp_path / "s" / INDEX_FILE).is_file() and not OutputLock(path).path.exists()


RANK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch.distributed as dist
    from kscale.output import LockLost, OutputLock, write_json_atomic
    from kscale.train.engine import fence_all_ranks

    run, rank, port = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    lock = OutputLock(run) if rank == 0 else None  # rank 0 claims the run (kscale.train.run._claimed)
    if lock:
        lock.acquire()
    fence_all_ranks(run)  # still ours: every rank goes on
    dist.barrier()
    if lock:  # taken over from another node while this run was paused
        write_json_atomic(lock.path, {"user": "u", "host": "node-b", "pid": 1, "started_at": "t",
                                      "token": "node-b", "pid_start": None})
    dist.barrier()
    try:
        fence_all_ranks(run)
        print("WROTE", flush=True)
    except LockLost:
        print("STOPPED", flush=True)
    dist.destroy_process_group()
""")


def test_every_train_rank_stops_when_rank_0s_lock_was_taken_over(tmp_path) -> None:
    """Rank 0 alone raising would leave the other ranks in the checkpoint's collectives (a hang)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path / "run"), str(r), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=180) for p in ranks]
    finally:
        for p in ranks:  # the processes this test started
            p.kill()
    assert [o.strip() for o, _ in outs] == ["STOPPED", "STOPPED"], [e[-1500:] for _, e in outs]
