"""A helper process for the pictures' t-SNE maps, beside the analysis.

t-SNE is seconds of one CPU, mostly holding the GIL, and openTSNE's import (through scikit-learn) is over
a second: in a thread it only slows the analysis down. :class:`MapsHelper` starts one child process
(``python -P -m kscale.analysis.maps_helper``) at the lowest CPU priority (``nice`` 19) when the analysis
starts; it imports openTSNE at once, and takes each picture layer's points as soon as its subsample is
read. It runs on CPU the analysis leaves idle, and its maps are the ones computed in place (same library,
same input, one thread: tests/unit/analysis/test_embed_helper.py).

Not ``multiprocessing``: its spawn re-imports the caller's main script in the child (a user's script
without a ``__main__`` guard would run again) and cannot start from ``python -``.

Protocol: length-prefixed pickles over the child's stdin/stdout, ``(job, name, args)`` in and
``(job, ok, pickled value)`` out (the value pickled apart, so one that cannot be read here fails only its
own map), between this module and the child it started (nothing else writes to either
pipe; the child's own prints go to its stderr). The child ends at the end of its input, so a driver
that dies, even by SIGKILL, leaves no helper behind once its current map is done.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Self

_HEAD = struct.Struct("<Q")


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

    def __init__(self, warm_tsne: bool = True, python: str | None = None):
        env = dict(os.environ)  # this kscale, whatever the child's working directory or installed copy
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.proc = subprocess.Popen([python or sys.executable, "-P", "-m", "kscale.analysis.maps_helper",
                                      "warm" if warm_tsne else "cold"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._next, self._dead = 0, False
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

    def _call(self, name: str, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            if not self._dead:
                job, self._next = self._next, self._next + 1
                self._pending[job] = fut
                self._outbox.put((job, name, args))
                return fut
        fut.set_exception(HelperDied(f"the maps helper (pid {self.proc.pid}) has ended"))
        return fut

    def _write(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                _send(self.proc.stdin, msg)
            except (OSError, ValueError):  # a closed pipe: the helper is gone (the reader fails what waits)
                return

    def _read(self) -> None:
        while True:
            try:
                msg = _recv(self.proc.stdout)
            except (OSError, ValueError, pickle.UnpicklingError, EOFError):
                msg = None
            if msg is None:
                break
            job, ok, payload = msg
            with self._lock:
                fut = self._pending.pop(job, None)
            if fut is None:
                continue
            try:
                value = pickle.loads(payload)
            except Exception as err:  # noqa: BLE001  (e.g. an error class this side cannot import)
                fut.set_exception(HelperDied(f"the maps helper's answer could not be read here: {err!r}"))
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        with self._lock:
            self._dead = True
            pending, self._pending = list(self._pending.values()), {}
        for fut in pending:
            fut.set_exception(HelperDied(f"the maps helper (pid {self.proc.pid}) ended before answering"))

    def close(self, wait: bool = True) -> None:
        """End the helper: at the end of its input when ``wait`` (it finishes the maps sent), else now."""
        self._outbox.put(None)
        if wait:
            self._writer.join()
        else:
            self.proc.kill()  # the child this object started, by its own handle
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):  # a broken pipe on the last flush: the helper is gone
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._writer.join(timeout=10)
        self._reader.join(timeout=10)
        self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(wait=kind is None)  # on an error, do not wait for a map nobody will draw


def _serve(warm: bool) -> None:
    os.nice(19)  # idle CPU only: the analysis that waits for the maps goes first
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # the protocol's pipe carries nothing else
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
    _serve(sys.argv[1:] == ["warm"])
