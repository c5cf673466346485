"""One output policy for every stage: what happens when ``output.path`` exists, how a new output appears,
and the one writer allowed at a time.

Every stage entry (``run_extract``, ``run_analyze``, ``run_train``, ``run_bias``) calls
:func:`claim_output` before it touches its output and keeps the claim until it is done::

    with claim_output(path, spec.output.if_exists, STORE_KIND, spec.fingerprint(), create=make_store):
        ... write shards, tables, reports ...

The claim does, in this order:

1. **Lock** (:class:`OutputLock`): ``.<name>.lock`` beside the output, created exclusively (a hard link
   of a fully written temp file: atomic on local disks and NFS). It names its holder (user, host, pid,
   start time, a random token). A second run is refused with :class:`OutputLocked`. A lock is stale only
   when its holder is provably gone: on this host its pid is dead (or reused); on another host its
   mtime, which the holder refreshes every ``heartbeat_s``, is older than ``stale_after_s``. A live
   lock is never taken over. The lock sits beside the output (not in it) so that creation and
   ``overwrite`` can replace the whole folder under it. Writes are **fenced** with the lock's token
   (:func:`fence`): a holder that was paused past the takeover time and finds another token in the lock
   file raises :class:`LockLost` before its next commit, instead of writing beside the run that took over.
2. **Garbage**: leftovers of an interrupted creation or overwrite (``.<name>.tmp-*`` siblings) are
   removed; while we hold the lock nobody else can be making them.
3. **Policy** (``output.if_exists``) on an existing, non-empty output: it must be *this stage's kind*
   (:class:`OutputKind`: a Zarr store by its root attributes, a run folder by its ``kscale.json`` /
   ``bias.json`` marker), else :class:`ForeignOutput` and nothing is touched. Then ``fail`` refuses
   (:class:`OutputExists`), ``resume`` continues (a kind that records a spec fingerprint must match it),
   ``overwrite`` builds the new output beside the old one, then swaps them (:func:`replace_dir_atomic`):
   a failed creation leaves the old output as it was, and a kill between the two renames leaves it aside
   where the next claim puts it back (:func:`remove_garbage`).
   A refusal of ``resume`` says what changed: the data (:class:`DataChanged`, from the identities) or the
   spec fields (from the ``spec`` the marker recorded).
4. **Atomic creation** (:func:`create_dir_atomic`): a new output is built as ``.<name>.tmp-<pid>``
   (marker included) and renamed into place, so it appears complete or not at all.

This module imports nothing from kscale: every layer (store markers, executors' progress files, the
cluster records) uses its :func:`write_json_atomic`.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from kscale.errors import KscaleError

IfExists = Literal["resume", "fail", "overwrite"]
RUN_MARKER = "kscale.json"  # the kind marker of run folders (train, analyze)
RUN_FORMAT = "kscale-run"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # another host's lock older than this (20 missed heartbeats) is stale


class OutputError(KscaleError, RuntimeError):
    """``output.path`` cannot be used as asked; the message names the path and why."""


class OutputExists(OutputError):
    """The output exists and the policy (``fail``, or ``resume`` of another spec) refuses it."""


class ForeignOutput(OutputError):
    """The path holds something that is not this stage's kind of output: never written into or deleted."""


class DataChanged(OutputExists):
    """``resume`` of an output whose input data changed since it was written (manifest bytes, dataset
    fingerprint): continuing would mix shards of two datasets. The message says what changed."""


class OutputLocked(OutputError):
    """Another run holds the output's lock; the message says who."""


class LockLost(OutputLocked):
    """This run's lock now carries another run's token (it was judged stale, e.g. while this process was
    paused, and taken over): this run must stop before its next write. Raised by :func:`fence`."""


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a part (fsync file and folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        _write_synced(tmp, _dumps(obj))
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave no partial temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def create_json_exclusive(path: str | Path, obj: Any) -> bool:
    """Create ``path`` with ``obj`` only if it does not exist (atomic, complete, NFS-safe: a hard link of
    a written temp file). Returns False, writing nothing, when ``path`` already exists."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    _write_synced(tmp, _dumps(obj))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: O_EXCL instead (not NFSv2-safe, still exclusive)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
            f.flush()
            os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is absent or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def temp_sibling(path: Path, tag: str = "") -> Path:
    """``.<name>.tmp-<tag><pid>``: where a new output is built; any such sibling is garbage once
    its creator is gone (:func:`remove_garbage`)."""
    return path.with_name(f".{path.name}.tmp-{tag}{os.getpid()}")


def remove_garbage(path: Path) -> list[Path]:
    """Delete leftovers of interrupted creations/overwrites of ``path``; call only while holding its lock.

    An old output set aside by an overwrite that was killed before the new one took its place (``path``
    absent, one ``.<name>.tmp-old-<pid>``) is put back first: an overwrite never loses the old output."""
    removed = []
    prefix = f".{path.name}.tmp-"
    siblings = sorted(path.parent.glob(f"{prefix}*")) if path.parent.is_dir() else []
    old = [p for p in siblings if re.fullmatch(r"old-\d+", p.name[len(prefix):]) and p.is_dir() and not p.is_symlink()]
    if len(old) == 1 and not path.exists() and not path.is_symlink():
        os.rename(old[0], path)
        _fsync_dir(path.parent)
        siblings.remove(old[0])
    for p in siblings:
        if not re.fullmatch(r"(old-)?\d+", p.name[len(prefix):]):  # e.g. another output named NAME.tmp-x
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _built(path: Path, populate: Callable[[Path], None]) -> Path:
    """A temp sibling of ``path`` filled by ``populate(tmp)`` (removed again if that fails)."""
    tmp = temp_sibling(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        populate(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def create_dir_atomic(path: Path, populate: Callable[[Path], None]) -> Path:
    """Build a folder in a temp sibling with ``populate(tmp)`` and rename it to ``path`` (which must be
    absent or an empty folder): readers and later runs see the complete folder or none."""
    tmp = _built(path, populate)
    os.rename(tmp, path)  # replaces an empty directory atomically; fails on a non-empty one
    _fsync_dir(path.parent)
    return path


def replace_dir_atomic(path: Path, populate: Callable[[Path], None]) -> Path:
    """Replace the folder ``path`` by a new one built with ``populate``: the new one is complete before the
    old one moves; the old one is put back if the swap fails, and deleted only once the new one is in place.
    A kill between the two renames leaves the old one as ``.<name>.tmp-old-<pid>``, which the next claim
    puts back (:func:`remove_garbage`)."""
    tmp = _built(path, populate)  # a failure here leaves the old output untouched
    old = temp_sibling(path, "old-")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(old)
    return path


# ----------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class OutputKind:
    """What one stage's output looks like. ``read_marker(path)`` returns the marker (a dict, with
    ``spec_fingerprint`` where recorded) of an output of this kind, None for anything else.
    ``check_fingerprint``: ``resume`` requires the same spec fingerprint (a different spec would mix)."""

    label: str  # "store", "bias run", "train run", "analysis run": used in messages
    read_marker: Callable[[Path], dict | None]
    check_fingerprint: bool = True


def run_marker_reader(kind: str) -> Callable[[Path], dict | None]:
    """``read_marker`` for run folders that carry ``kscale.json`` with ``{"format": "kscale-run",
    "kind": kind}``."""

    def read(path: Path) -> dict | None:
        m = read_json(path / RUN_MARKER)
        return m if m and m.get("format") == RUN_FORMAT and m.get("kind") == kind else None

    return read


def run_marker(kind: str, fingerprint: str | None, data: dict | None = None, spec: dict | None = None) -> dict:
    """``kscale.json`` of a run folder; ``data`` (the input data's identity) and the spec fingerprint are
    checked on resume; ``spec`` (the whole spec as a dict) lets a refusal say what changed."""
    marker = {"format": RUN_FORMAT, "kind": kind, "spec_fingerprint": fingerprint,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {**marker, **({"data": data} if data else {}), **({"spec": spec} if spec else {})}


_NOT_FINGERPRINTED = ("resources", "cluster", "output.if_exists")  # what JobSpec.fingerprint() leaves out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def recorded_spec(spec: dict) -> dict:
    """What a run marker records of a spec (as a dict): the fingerprinted fields only. Never ``cluster``
    (its ``env`` may hold secrets) nor ``resources``; enough for a refusal to name what changed."""
    out = {k: v for k, v in spec.items() if k not in ("resources", "cluster")}
    if isinstance(out.get("output"), dict):
        out["output"] = {k: v for k, v in out["output"].items() if k != "if_exists"}
    return out


def describe_spec_change(old: Any, new: Any, limit: int = 6) -> str:
    """``"train.lr was 0.0001, now 0.0002; ..."``: the fields (dotted) that differ between two specs as
    dicts, leaving out what the fingerprint does not cover; "" when either is unknown or none differs."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == p or k.startswith(p + ".") for p in _NOT_FINGERPRINTED)]
    parts = [f"{k} was {a.get(k)!r}, now {b.get(k)!r}" for k in keys[:limit]]
    return "; ".join(parts) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def apply_policy(path: Path, if_exists: IfExists, kind: OutputKind, fingerprint: str | None,
                 create: Callable[[Path], None], data: dict | None = None, spec: dict | None = None) -> bool:
    """Check or make ``path`` per ``if_exists``; True when a new output was created. Call under the lock.
    ``data``: the input data's identity now (:func:`kscale.data.identity.data_identity`); ``resume`` refuses
    an output whose marker recorded another (:class:`DataChanged`), whatever ``check_fingerprint`` says.
    ``spec``: this spec as a dict, compared with the marker's ``spec`` to say which fields changed."""
    if path.exists() and not path.is_dir():
        raise ForeignOutput(f"output.path: {str(path)!r} exists and is not a folder; refusing to touch it")
    if not _non_empty(path):
        create_dir_atomic(path, create)
        return True
    found = kind.read_marker(path)
    if found is None:
        raise ForeignOutput(f"output.path: {str(path)!r} exists and is not a kscale {kind.label}; "
                            "refusing to write into it")
    if if_exists == "fail":
        raise OutputExists(f"output.path: {kind.label} {str(path)!r} exists and output.if_exists is 'fail'")
    if if_exists == "overwrite":
        replace_dir_atomic(path, create)
        return True
    recorded = found.get("data")
    from kscale.data.identity import describe_change, identity_changed

    if data is not None and recorded and "unreadable" not in recorded and identity_changed(recorded, data):
        raise DataChanged(f"output.path: {kind.label} {str(path)!r} cannot be resumed: "
                          f"{describe_change(recorded, data)}; restore the data, or write to another path "
                          "(or output.if_exists: overwrite)")
    if kind.check_fingerprint and found.get("spec_fingerprint") != fingerprint:
        what = describe_spec_change(found.get("spec"), spec)
        raise OutputExists(
            f"output.path: {kind.label} {str(path)!r} was written by a different spec (fingerprint "
            f"{found.get('spec_fingerprint')}, this spec {fingerprint}{': ' + what if what else ''}); "
            "choose another path or output.if_exists: overwrite")
    return False


@contextmanager
def claim_output(path: str | Path, if_exists: IfExists, kind: OutputKind, fingerprint: str | None,
                 create: Callable[[Path], None], lock: OutputLock | None = None,
                 data: dict | None = None, spec: dict | None = None) -> Iterator[Path]:
    """Lock ``path``, clear garbage, apply the policy, yield the path; release the lock at the end."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (lock or OutputLock(path)).held():
        fence(path)  # still ours (see OutputLock._break): nothing below may run beside another holder
        remove_garbage(path)
        apply_policy(path, if_exists, kind, fingerprint, create, data, spec)
        yield path


# ----------------------------------------------------------------------------- the lock


@dataclass(frozen=True)
class LockHolder:
    user: str
    host: str
    pid: int
    started_at: str
    token: str
    pid_start: str | None = None  # the process's start time (/proc), guards against pid reuse

    def describe(self) -> str:
        return f"{self.user}@{self.host} pid {self.pid} since {self.started_at}"


def _pid_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def _user() -> str:
    """The login name, or the numeric uid where there is none: ``getpass.getuser`` raises without a passwd
    entry and without ``USER``/``LOGNAME`` (OpenShift-style pods run under an arbitrary uid)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):
        return str(os.getuid())


_HELD: dict[str, OutputLock] = {}  # output (absolute) -> the lock this process holds on it (see fence)


def _key(output: str | Path) -> str:
    return str(Path(output).expanduser().absolute())


def fence(output: str | Path) -> None:
    """Before a write that commits something into ``output`` (a shard marker, the index, a checkpoint):
    raise :class:`LockLost` if this process holds the lock of ``output`` and the lock file no longer
    carries its token. A process that holds no lock on ``output`` (a Ray worker, whose driver fences; a
    test writing a store by hand) passes. One small file read."""
    lock = _HELD.get(_key(output))
    if lock is not None:
        lock.check()


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """The exclusive lock of one output (see the module docstring). Use :meth:`held` as a context."""

    def __init__(self, output: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.output = Path(output)
        self.path = self.output.with_name(f".{self.output.name}.lock")
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder: LockHolder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def read(self) -> LockHolder | None:
        data = read_json(self.path)
        try:
            return LockHolder(**data) if data else None
        except TypeError:
            return None

    def is_stale(self, holder: LockHolder | None, mtime: float) -> bool:
        if holder is not None and holder.host == socket.gethostname():
            return not pid_alive(holder.pid) or (
                holder.pid_start is not None and _pid_start(holder.pid) not in (None, holder.pid_start))
        return time.time() - mtime > self.stale_after_s  # another host (or unreadable): no heartbeat

    def acquire(self) -> LockHolder:
        me = LockHolder(_user(), socket.gethostname(), os.getpid(),
                        time.strftime("%Y-%m-%dT%H:%M:%S%z"), secrets.token_hex(8), _pid_start(os.getpid()))
        for _ in range(5):
            if create_json_exclusive(self.path, asdict(me)):
                self.holder = me
                _HELD[_key(self.output)] = self
                self._start_heartbeat()
                return me
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            other = self.read()
            if not self.is_stale(other, mtime):
                who = other.describe() if other else "an unreadable lock file"
                raise OutputLocked(f"output.path: {str(self.output)!r} is being "
                                   f"written by another run ({who}; lock {self.path}); wait for it or stop it")
            self._break(other)
        raise OutputLocked(f"output.path: could not take the lock {self.path} (contended)")

    def _break(self, stale: LockHolder | None) -> None:
        """Remove a stale lock, and only that one: move it aside (atomic), check it is the lock we judged
        stale, and put it back if another run replaced it in between. The put-back replaces whatever a
        third run created in the moment the path was free: that run has held it for microseconds and
        meets another token at its first :func:`fence` (in :func:`claim_output`, before any write), while
        the live lock we moved may have been held for hours: it is never dropped."""
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        data = read_json(aside)
        moved = data.get("token") if data else None
        if moved != (stale.token if stale is not None else None):
            os.replace(aside, self.path)  # a live lock taken meanwhile: restore it
            _fsync_dir(self.path.parent)
        else:
            aside.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise :class:`LockLost` unless the lock file still carries this holder's token."""
        current = self.read()
        if self.holder is None or current is None or current.token != self.holder.token:
            who = current.describe() if current else "nobody"
            raise LockLost(f"output.path: {str(self.output)!r}: this run's lock was taken over (the lock "
                           f"{self.path} now names {who}); stopping before the next write")

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                current = self.read()
                if self.holder is None or current is None or current.token != self.holder.token:
                    return  # taken over: never keep another run's lock fresh (writes stop at fence)
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._beat = threading.Thread(target=beat, name="kscale-output-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        current = self.read()
        if self.holder is not None and current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        if _HELD.get(_key(self.output)) is self:
            del _HELD[_key(self.output)]
        self.holder = None

    @contextmanager
    def held(self) -> Iterator[LockHolder]:
        holder = self.acquire()
        try:
            yield holder
        finally:
            self.release()
