"""Two live writers of one shard commit at once (a lost node's worker still running and its replacement):
the commit keeps exactly one, and the committed shard is whole.

Both writers are open at once (B is created while A writes: B leaves A's staging folder alone,
``kscale/store/staging.py``). The dangerous interleaving is forced with two processes: writer A renames its
staging folder into place and is held (``fsync`` of ``shards/`` slowed) before it creates the marker; writer B
starts its commit right then, and is held after any deletion of the shard folder until A's marker exists.
Without the in-flight check B deleted A's just-renamed folder and A's marker then named nothing (a committed
shard without data); with B's constructor deleting every staging folder of the shard (before owner records)
A's commit failed.
"""

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

import kscale.store
from kscale.store.verify import verify_store
from tests.unit.test_store_v2 import make_store

SHARD = 1  # make_store(n_shards=1) writes s000000; both processes write s000001


def _writer_a(store: str, flag: str, out) -> None:
    """Write the shard, wait until B is open too, commit, holding 1.5 s between the rename and the marker."""
    import kscale.store.writer as writer

    real = writer.fsync_path

    def slow_fsync(p):
        real(p)
        if Path(p) == Path(store) / "shards":  # called right after the rename, before the marker
            Path(flag).write_text("renamed")
            time.sleep(1.5)

    writer.fsync_path = slow_fsync
    _commit(store, out, "A", opened=flag + ".a-open", then=flag + ".b-open")


def _writer_b(store: str, flag: str, out) -> None:
    """Open once A has written, commit once A's folder is in place; held 3 s after deleting the shard's folder,
    if it does."""
    import kscale.store.writer as writer

    real = writer.shutil.rmtree

    def slow_rmtree(p, *a, **k):
        real(p, *a, **k)
        if Path(p).name in (f"s{SHARD:06d}",):
            time.sleep(3)

    writer.shutil.rmtree = slow_rmtree
    _wait(flag + ".a-open")
    _commit(store, out, "B", opened=flag + ".b-open", then=flag)


def _wait(flag: str) -> None:
    deadline = time.monotonic() + 60
    while not Path(flag).exists():
        assert time.monotonic() < deadline, flag
        time.sleep(0.005)


def _commit(store: str, out, who: str, opened: str, then: str) -> None:
    """Open a writer and write the shard, say so (``opened``), wait for ``then``, commit."""
    from kscale.store.writer import ShardCommitted
    from tests.unit.test_store_staging import _append, _commit as commit, _writer

    try:
        w = _writer(store, SHARD)
        _append(w, SHARD, 0)
        _append(w, SHARD, 1)
        open_staging = [p.name for p in (Path(store) / "shards").glob(f".s{SHARD:06d}.tmp-*") if p.is_dir()]
        out.put((who + " open", len(open_staging)))
        Path(opened).write_text("open")
        _wait(then)
        commit(w, SHARD)
        out.put((who, "committed"))
    except ShardCommitted:
        out.put((who, "yielded"))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put((who, f"{type(e).__name__}: {e}"))


def test_two_writers_committing_one_shard_keep_one_whole_shard(tmp_path):
    store = make_store(tmp_path / "s", n_shards=1)
    reference = make_store(tmp_path / "ref", n_shards=2)
    flag = str(tmp_path / "a-renamed")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer_a, args=(store, flag, out)),
             ctx.Process(target=_writer_b, args=(store, flag, out))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    results = dict(out.get(timeout=5) for _ in range(2 * len(procs)))
    assert results.pop("B open") == 2, "B did not see A's staging folder beside its own"
    results.pop("A open")
    assert sorted(results.values()) == ["committed", "yielded"], results
    assert results["A"] == "committed", results  # the writer whose folder was in place first keeps the shard
    shards = Path(store) / "shards"
    assert (shards / f"s{SHARD:06d}").is_dir(), "the committed shard's folder is gone"
    assert verify_store(store) == []
    got, want = kscale.store.open(store), kscale.store.open(reference)
    assert sorted(got.shards) == sorted(want.shards)
    for m in ("text", "image"):
        for layer in got.layers:
            a, b = got.keys(layer, m).compute(), want.keys(layer, m).compute()
            assert a.dtype == b.dtype and np.array_equal(a, b), (m, layer)
    assert not list(shards.glob(".s*.tmp-*")), "the yielding writer leaves no staging folder"
