"""A helper process for the pictures' t-SNE maps, beside the analysis.

t-SNE is seconds of one CPU, mostly holding the GIL, and openTSNE's import (through scikit-learn) is over
a second: in a thread it only slows the analysis down. :class:`MapsHelper` starts one child process
(``python -P -m kscale.analysis.maps_helper``) at the lowest CPU priority (``nice`` 19) when the analysis
starts; it imports openTSNE at once, and takes each picture layer's points as soon as its subsample is
read. It runs on CPU the analysis leaves idle, and its maps are the ones computed in place (same library,
same input, one thread: tests/unit/analysis/test_embed_helper.py).

Not ``multiprocessing``: its spawn re-imports the caller's main script in the child (a user's script
without a ``__main__`` guard would run again) and cannot start from ``python -``.

Protocol: length-prefixed pickles over two private pipes, ``(job, name, args)`` in and ``(job, ok,
pickled value)`` out (the value pickled apart, so one that cannot be read here fails only its own map).
The pipes are not the child's stdin/stdout: they are passed as extra file descriptors (``pass_fds``), so
nothing but this module and the child's loop can write into them. A stray write to stdout (a library's
print, C code writing to fd 1, a ``sitecustomize`` at start-up) goes to the child's stderr and cannot
break the framing. The child ends at the end of its input, so a driver that dies, even by SIGKILL, leaves
no helper behind once its current map is done.

No wait is unbounded: if the reader thread ends for any reason, every pending map fails with
:class:`HelperDied` (it is then computed in place), and a map's ``result()`` gives up after the helper has
been busy for ``stall_s`` seconds without answering anything (it is stopped, deadlocked...): the helper is
killed and every pending map fails the same way.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Self

_HEAD = struct.Struct("<Q")
STALL_S = 600.0  # busy without any answer this long: the helper is stuck (one map takes seconds)


class HelperDied(RuntimeError):
    """The helper process ended before answering (the map is then computed in place)."""


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEAD.pack(len(data)) + data)
    stream.flush()


def _recv(stream):
    """The next message, or None at the end of the stream (or a cut one)."""
    head = stream.read(_HEAD.size)
    if len(head) < _HEAD.size:
        return None
    (n,) = _HEAD.unpack(head)
    data = stream.read(n)
    return pickle.loads(data) if len(data) == n else None


class _Answer(Future):
    """A future of one answer of the helper. ``result()`` without a timeout is bounded all the same: it
    gives up once the helper has been busy ``stall_s`` seconds without answering (:meth:`MapsHelper.wait`)."""

    def __init__(self, helper: MapsHelper):
        super().__init__()
        self._helper = helper

    def result(self, timeout: float | None = None):
        if timeout is None:
            return self._helper.wait(self)
        return super().result(timeout)


class MapsHelper:
    """The helper process and its pending answers; ``close()`` when done (or use it as a context manager)."""

    @classmethod
    def start(cls, warm_tsne: bool = True, python: str | None = None) -> MapsHelper | None:
        """A started helper, or None where no process can be started here (the maps are then computed in
        place, as before: the helper only ever saves time)."""
        try:
            return cls(warm_tsne, python)
        except OSError:
            return None

    def __init__(self, warm_tsne: bool = True, python: str | None = None, stall_s: float = STALL_S):
        env = dict(os.environ)  # this kscale, whatever the child's working directory or installed copy
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        req_r, req_w = os.pipe()  # driver -> helper; both ends close-on-exec: no other child inherits them
        ans_r, ans_w = os.pipe()  # helper -> driver
        try:
            self.proc = subprocess.Popen([python or sys.executable, "-P", "-m", "kscale.analysis.maps_helper",
                                          "warm" if warm_tsne else "cold", str(req_r), str(ans_w)],
                                         stdin=subprocess.DEVNULL, env=env, close_fds=True, pass_fds=(req_r, ans_w))
        except BaseException:
            for fd in (req_w, ans_r):
                os.close(fd)
            raise
        finally:
            os.close(req_r)  # the child's ends: the child holds the only copies now (its end of input
            os.close(ans_w)  # is ours closing req_w, the reader's is the child ending)
        self._to, self._from = os.fdopen(req_w, "wb"), os.fdopen(ans_r, "rb")
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._next, self._dead = 0, False
        self._progress = time.monotonic()  # the last answer, or when the helper last became busy
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # a writer thread: a map's points (MBs) wait
        self._writer = threading.Thread(target=self._write, name="kscale-maps-writer", daemon=True)  # there,
        self._reader = threading.Thread(target=self._read, name="kscale-maps-reader", daemon=True)  # not us
        self._writer.start()
        self._reader.start()

    def tsne(self, x_nF, perplexity: float, seed: int) -> Future:
        """A future of :func:`kscale.analysis.embed.tsne_2d` ``(x_nF, perplexity, seed)``."""
        return self._call("tsne", x_nF, perplexity, seed)

    def pid(self) -> int:
        """The helper's process id, from the helper (it answers in order: it is up and niced)."""
        return self._call("pid").result()

    def wait(self, fut: Future):
        """``fut``'s value, waiting only while the helper makes progress: once it has been busy ``stall_s``
        seconds without answering, it is killed and every pending map fails with :class:`HelperDied`."""
        while True:
            try:
                return Future.result(fut, timeout=min(1.0, self.stall_s))
            except TimeoutError:
                pass
            with self._lock:
                stalled = time.monotonic() - self._progress > self.stall_s
            if stalled:
                self._fail_pending(f"the maps helper (pid {self.proc.pid}) gave no answer for "
                                   f"{self.stall_s:g} s; stopped")
                self.proc.kill()  # the child this object started, by its own handle

    def _call(self, name: str, *args) -> Future:
        fut: Future = _Answer(self)
        with self._lock:
            if not self._dead:
                job, self._next = self._next, self._next + 1
                if not self._pending:
                    self._progress = time.monotonic()  # busy from now on
                self._pending[job] = fut
                self._outbox.put((job, name, args))
                return fut
        fut.set_exception(HelperDied(f"the maps helper (pid {self.proc.pid}) has ended"))
        return fut

    def _fail_pending(self, why: str) -> None:
        """No more answers will be read: fail every pending map (and every later one, at once)."""
        with self._lock:
            self._dead = True
            pending, self._pending = list(self._pending.values()), {}
        for fut in pending:
            fut.set_exception(HelperDied(why))

    def _write(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                _send(self._to, msg)
            except (OSError, ValueError):  # a closed pipe: the helper is gone (the reader fails what waits)
                return

    def _read(self) -> None:
        why = f"the maps helper (pid {self.proc.pid}) ended before answering"
        try:
            while (msg := _recv(self._from)) is not None:
                self._answer(*msg)
        except Exception as err:  # noqa: BLE001  (a cut or garbled stream, a bug: pending maps must not wait)
            why = f"the maps helper's answers could not be read ({err!r})"
            self.proc.kill()  # its later answers would never be read
        finally:
            self._fail_pending(why)

    def _answer(self, job: int, ok: bool, payload: bytes) -> None:
        with self._lock:
            fut = self._pending.pop(job, None)
            self._progress = time.monotonic()
        if fut is None:
            return
        try:
            value = pickle.loads(payload)
        except Exception as err:  # noqa: BLE001  (e.g. an error class this side cannot import)
            fut.set_exception(HelperDied(f"the maps helper's answer could not be read here: {err!r}"))
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def close(self, wait: bool = True) -> None:
        """End the helper: at the end of its input when ``wait`` (it finishes the maps sent, within
        ``stall_s``), else now."""
        self._outbox.put(None)
        if wait:
            self._writer.join(timeout=self.stall_s)
        if not wait or self._writer.is_alive():
            self.proc.kill()  # the child this object started, by its own handle
        try:
            self._to.close()
        except (OSError, ValueError):  # a broken pipe on the last flush: the helper is gone
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._writer.join(timeout=10)
        self._reader.join(timeout=10)
        if not self._reader.is_alive():
            self._from.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(wait=kind is None)  # on an error, do not wait for a map nobody will draw


def _serve(warm: bool, fd_in: int, fd_out: int) -> None:
    os.nice(19)  # idle CPU only: the analysis that waits for the maps goes first
    inp, out = os.fdopen(fd_in, "rb"), os.fdopen(fd_out, "wb")  # the private pipes: nothing else writes there
    os.dup2(2, 1)  # stray writes to stdout (prints, C libraries) go to stderr, where a reader can see them
    sys.stdout = sys.stderr
    if warm:
        try:
            import openTSNE  # noqa: F401  (over a second of import, paid here beside the analysis)
        except ImportError:
            pass  # raised where a map is asked for
    from kscale.analysis.embed import tsne_2d

    calls = {"tsne": tsne_2d, "pid": os.getpid}
    while (msg := _recv(inp)) is not None:
        job, name, args = msg
        try:
            ok, value = True, calls[name](*args)
        except Exception as err:  # noqa: BLE001  (sent back, raised where the map is asked for)
            ok, value = False, err
        try:  # the value is pickled on its own: an answer that cannot be read fails only its own map
            payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # noqa: BLE001
            ok, payload = False, pickle.dumps(RuntimeError(f"maps helper: {value!r} ({err!r})"))
        _send(out, (job, ok, payload))


if __name__ == "__main__":
    _serve(sys.argv[1] == "warm", int(sys.argv[2]), int(sys.argv[3]))
