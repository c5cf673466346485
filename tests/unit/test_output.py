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
