"""Staging folders of shard writers: names unique across hosts, an owner record with a heartbeat, and the one
rule by which a process may delete another writer's staging folder.

Several nodes write one store on a shared filesystem, and two writers of one shard can both be alive (a retried
task while the first attempt still runs; a worker on a node presumed lost that is in fact alive). So:

* **Names.** The ``ShardWriter`` of shard ``sNNNNNN`` writes ``shards/.sNNNNNN.tmp-<host>-<pid>-<token>/``
  (``layout.staging_dir``; ``<token>`` is 16 random hex digits): no two writers share a folder, not two
  processes of one pid on two hosts, not two writers of one shard in one process.
* **Owner record.** Beside the folder, created first and exclusively: ``.sNNNNNN.tmp-<host>-<pid>-<token>.owner``
  (``layout.staging_record``), JSON naming the host, the machine (boot id and pid namespace, so that "same
  machine" is exact even for containers that share a host name), the pid, the process's start time and the
  token. Its mtime is the writer's **heartbeat**: while the writer is open, one thread per process touches the
  records of its open writers every ``HEARTBEAT_S``. A writer stops it when it commits or fails, and when it
  is garbage-collected (a writer abandoned by a failed shard).
* **Who may delete a staging folder** (the shard's next writer, in its constructor; ``sweep`` at the start of
  a run): only one whose owner is **provably dead**:

  - on the same machine (same boot id and pid namespace): its pid is gone or reused (another start time);
    in this very process: its writer is committed, failed or collected;
  - anywhere: its heartbeat is older than ``STALE_S`` (``HEARTBEAT_S`` x 12).

  A live writer's folder is never deleted: both writers run on, and the commit protocol (``writer.py``: rename
  into place, exclusive marker, the ``COMMIT_RACE_S`` in-flight window) keeps exactly one.
* **Deleting** is: unlink the record, rename the folder aside (``<name>.dead-<hex>``, atomic), ``rmtree``.
  A writer checks right before its commit's rename that its record still names it and its folder is the one
  it made (same inode): a writer judged dead while it was in fact paused (for longer than ``STALE_S``) fails
  its commit (``StagingLost``) instead of publishing a folder that lost files or was recreated by a late
  write; once its rename is done, the deleter's rename finds nothing.

**Clocks and NFS.** A heartbeat's age is the filesystem's "now" (the mtime of a file just created in
``shards/``: our own record, or a probe) minus the record's mtime: both are set by the filesystem (the server
on NFS: ``utime(path, None)`` asks for server time), so node clocks need not agree. The record is opened and
then ``fstat``-ed, not ``stat``-ed: NFS's close-to-open consistency revalidates attributes at open, while a
plain ``stat`` may answer from an attribute cache up to ``acregmax`` (60 s by default) old. ``STALE_S`` =
120 s is 12 missed heartbeats, above that 60 s too (a ``nocto`` mount cannot make a live writer look dead),
and far above mtime granularity (1-2 s on some servers). The price: a killed writer's folder on another node
lives up to 2 minutes (disk only; the shard's new writer writes its own folder meanwhile).

**Old names.** ``.sNNNNNN.tmp-<pid>`` (written before owner records; nothing writes them now) carry no record
and are removed as before: by the shard's next writer and by ``sweep``. Any other ``.*.tmp-*`` name in
``shards/`` (temp files of markers, ``.sNNNNNN.done.json.tmp-<pid>-<tid>``; folders renamed aside for deletion)
is garbage, removed as before. A new-style folder without a record (its deleter killed between the unlink and
the rename) is judged by its own mtime.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kscale.output import pid_alive
from kscale.store.layout import staging_dir, staging_record

HEARTBEAT_S = 10.0  # how often a live writer touches its owner record
STALE_S = 12 * HEARTBEAT_S  # a record untouched for this long is a dead writer's (see the module docstring)
RECORD_SUFFIX = ".owner"
_TAG = re.compile(r"(?P<host>[A-Za-z0-9_.]*)-(?P<pid>\d+)-(?P<token>[0-9a-f]{16})")


class StagingLost(RuntimeError):
    """This writer's staging folder was judged dead and removed (or replaced) by another process: the shard's
    commit is refused (a retry writes it again)."""


# ------------------------------------------------------------------------------------------- who am I


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _machine() -> str:
    """Boot id and pid namespace: equal exactly when pids mean the same processes (empty off Linux)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    boot = _read("/proc/sys/kernel/random/boot_id")
    return f"{boot}/{ns}" if boot or ns else ""


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc field 22), None where unknown or gone."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if ")" in stat else None


def _safe_host(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", host)[:48]


@dataclass(frozen=True)
class Owner:
    """Who writes a staging folder (its owner record's contents)."""

    host: str
    machine: str
    pid: int
    pid_start: str | None
    token: str

    @property
    def tag(self) -> str:
        """``<host>-<pid>-<token>``: the staging folder's name after ``.<shard>.tmp-``."""
        return f"{_safe_host(self.host)}-{self.pid}-{self.token}"

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        return cls(socket.gethostname(), _machine(), pid, _proc_start(pid), secrets.token_hex(8))


# ------------------------------------------------------------------------------------------- heartbeat

_LIVE: dict[str, Path] = {}  # token -> owner record, for every open writer of this process
_LIVE_LOCK = threading.Lock()
_BEAT: list[threading.Thread] = []  # the heartbeat thread, while one runs


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _LIVE_LOCK:
            records = list(_LIVE.values())
            if not records:
                _BEAT.clear()
                return
        for p in records:
            try:
                os.utime(p)  # times=None: the filesystem's own clock (server time on NFS)
            except OSError:  # removed by a deleter that judged us dead: the commit will see it
                pass


def keep_alive(token: str, record: Path) -> None:
    with _LIVE_LOCK:
        _LIVE[token] = record
        if not _BEAT:
            _BEAT.append(threading.Thread(target=_beat, name="kscale-staging-heartbeat", daemon=True))
            _BEAT[0].start()


def let_die(token: str) -> None:
    """Stop the heartbeat of ``token``'s record (idempotent; also a writer's finalizer)."""
    with _LIVE_LOCK:
        _LIVE.pop(token, None)


def is_live(token: str) -> bool:
    with _LIVE_LOCK:
        return token in _LIVE


def _after_fork() -> None:  # a forked child runs none of its parent's writers (and no heartbeat thread)
    global _LIVE_LOCK
    _LIVE.clear()
    _BEAT.clear()
    _LIVE_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


# ------------------------------------------------------------------------------------------- the rule


def read_record(path: Path) -> tuple[dict | None, float | None]:
    """(record, mtime) of an owner record; (None, mtime) when unreadable, (None, None) when absent. Opened,
    then ``fstat``-ed: on NFS the open revalidates the attributes a ``stat`` may answer from cache."""
    try:
        with open(path, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            try:
                data = json.loads(f.read())
            except ValueError:
                return None, mtime
    except FileNotFoundError:
        return None, None
    return (data, mtime) if isinstance(data, dict) else (None, mtime)


def owner_dead(record: dict | None, mtime: float, fs_now: float) -> bool:
    """The rule of the module docstring: provably dead on this machine, or a heartbeat older than ``STALE_S``."""
    if record is not None and record.get("machine") == _machine() and (
            record.get("machine") or record.get("host") == socket.gethostname()):
        pid = int(record.get("pid", -1))
        start = _proc_start(pid)
        if pid <= 0 or not pid_alive(pid) or (record.get("pid_start") and start not in (None, record["pid_start"])):
            return True
        if pid == os.getpid():
            return not is_live(str(record.get("token")))
    return fs_now - mtime > STALE_S


def fs_clock(folder: Path) -> float:
    """The filesystem's "now": the mtime of a probe file created (and removed) in ``folder``."""
    fd, path = tempfile.mkstemp(prefix=".clock.tmp-", dir=folder)  # garbage to a sweep, like any .*.tmp-*
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(path)


def _remove(shards: Path, name: str, record: Path | None) -> None:
    """Delete a dead writer's staging: the record first (its writer's commit then refuses), the folder
    renamed aside (atomic against that writer's rename into place), then removed."""
    if record is not None:
        record.unlink(missing_ok=True)
    aside = shards / f"{name}.dead-{secrets.token_hex(4)}"
    try:
        os.rename(shards / name, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _garbage(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear(shards: Path, names: list[str], fs_now: float) -> list[str]:
    """Of ``names`` (``.*.tmp-*`` entries of ``shards``), remove what the rule allows; return the names removed.
    New-style staging folders and records by their owner, everything else (old names, marker temp files,
    folders renamed aside) as garbage."""
    gone = []
    present = set(names)
    for name in sorted(names):
        base = name[:-len(RECORD_SUFFIX)] if name.endswith(RECORD_SUFFIX) else name
        m = _TAG.fullmatch(base.split(".tmp-", 1)[1]) if ".tmp-" in base else None
        if m is None:  # the old rule: nothing live is named like this
            _garbage(shards / name)
            gone.append(name)
            continue
        if name.endswith(RECORD_SUFFIX) and base in present:
            continue  # judged with its folder
        record = shards / f"{base}{RECORD_SUFFIX}"
        data, mtime = read_record(record)
        if mtime is None:  # a folder without its record: by the folder's own age
            try:
                mtime = (shards / base).stat().st_mtime
            except FileNotFoundError:
                continue
        if owner_dead(data, mtime, fs_now):
            _remove(shards, base, record)
            gone += [n for n in (base, record.name) if n in present]
    return gone


def sweep(store: str | Path) -> list[str]:
    """Remove what dead writers left in ``shards/`` (``clear`` over every ``.*.tmp-*`` entry); return the names."""
    shards = Path(store, "shards")
    if not shards.is_dir():
        return []
    names = [e.name for e in os.scandir(shards) if e.name.startswith(".") and ".tmp-" in e.name]
    return clear(shards, names, fs_clock(shards)) if names else []


# ------------------------------------------------------------------------------------------- one writer's


class Staging:
    """One writer's staging folder: claimed (record, heartbeat, dead ones of the shard cleared, folder made),
    checked before the commit's rename, released after the marker or on failure."""

    def __init__(self, store: Path, shard: str):
        self.owner = Owner.me()
        self.shards = store / "shards"
        self.record = staging_record(store, shard, self.owner.tag)
        self.dir = staging_dir(store, shard, self.owner.tag)
        fd = os.open(self.record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps({**asdict(self.owner), "shard": shard,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
            fs_now = os.fstat(fd).st_mtime
        finally:
            os.close(fd)
        keep_alive(self.owner.token, self.record)
        prefix = f".{shard}.tmp-"
        clear(self.shards, [e.name for e in os.scandir(self.shards) if e.name.startswith(prefix)], fs_now)
        self.dir.mkdir()
        st = self.dir.stat()
        self.ino = (st.st_dev, st.st_ino)

    def check_ours(self) -> None:
        """Raise ``StagingLost`` unless the record still names this writer and the folder is the one it made."""
        data, _ = read_record(self.record)
        try:
            st = self.dir.stat()
        except FileNotFoundError:
            st = None
        if not data or data.get("token") != self.owner.token or st is None or (st.st_dev, st.st_ino) != self.ino:
            raise StagingLost(f"staging folder {str(self.dir)!r} was removed by another process that judged its "
                              f"writer dead (no heartbeat for {STALE_S:.0f} s?): the shard is not committed")

    def release(self, remove: bool) -> None:
        """Stop the heartbeat and drop the record; ``remove``: the folder too (a writer that gives up)."""
        let_die(self.owner.token)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.record.unlink(missing_ok=True)
