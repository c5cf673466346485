"""Local runs as records: ``kscale submit`` without a cluster target is a run like any other.

``LocalRun`` (a context used by ``kscale submit``) registers the run in ``$KSCALE_HOME/submissions/ID.json``
(target ``local``) and keeps its record dir in ``$KSCALE_HOME/runs/ID/``: ``ID.driver.log`` (everything the
CLI prints, Ray workers' output included, teed at the Python level), ``ID.state.json`` (RUNNING, then
SUCCEEDED / FAILED / STOPPED with the exit code and, when stopped, "N of M shards committed; rerun to
resume"). SIGTERM is turned into the same clean stop as Ctrl-C (``KeyboardInterrupt``): the runner's
``ray.shutdown()`` runs, the output lock is released, the state says STOPPED.

:class:`LocalTarget` answers ``kscale status/logs/stop`` for those records. ``stop`` signals the recorded
driver pid only when its kernel start time (``/proc/PID/stat`` field 22) and host match the record, so a
pid reused by another process is never signalled.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from kscale.output import write_json_atomic
from kscale.targets import Target
from kscale.targets.records import (Run, kscale_home, mark_progress_stopped, now, read_json, redact_overrides,
                                    save_submission, submission_id)

FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def pid_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # fields after "(comm)" start at field 3


def driver_alive(state: dict) -> bool:
    """True when the recorded driver still runs: same host, same pid, same kernel start time."""
    if state.get("host") != socket.gethostname() or not state.get("pid"):
        return False
    return pid_start_time(int(state["pid"])) == state.get("pid_start")


def runs_dir() -> Path:
    return kscale_home() / "runs"


class _Tee:
    """A text stream that writes to ``stream`` and to the run's log file (flushing both)."""

    def __init__(self, stream: Any, log: Any):
        self._stream, self._log = stream, log

    def write(self, s: str) -> int:
        n = self._stream.write(s)
        try:
            self._log.write(s)
            self._log.flush()
        except (OSError, ValueError):  # a full disk or closed log never breaks the run
            pass
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def shards_line(progress: dict | None, output: str | None = None) -> str:
    """``N of M shards committed`` from a ``_progress.json`` snapshot ("" when unknown).

    With ``output`` a key store, N is also counted from its commit markers, the truth: a shard whose
    commit finished on a worker while the driver was being stopped is on disk but was never reported
    to the driver's progress."""
    if not progress or not progress.get("shards_total"):
        return ""
    n = progress.get("shards_done", 0) + progress.get("shards_skipped", 0)
    if output is not None:
        from kscale.store.layout import marker_names

        n = max(n, len(marker_names(output)))
    return f"{n} of {progress['shards_total']} shards committed"


class LocalRun:
    """Record one local run (see the module doc). Use as ``with LocalRun(spec, spec_path) as run: ...`` and
    call ``run.finish(exit_code)``; an exception leaving the block records FAILED, Ctrl-C/SIGTERM STOPPED."""

    def __init__(self, spec: Any, spec_path: str, overrides: tuple[str, ...] = ()):
        self.spec, self.spec_path = spec, spec_path
        self.overrides = tuple(redact_overrides(overrides))  # as recorded: no cluster.env value
        self.sid = submission_id(spec)
        self.rec_dir = runs_dir() / self.sid
        self.state_path = self.rec_dir / f"{self.sid}.state.json"
        self.log_path = self.rec_dir / f"{self.sid}.driver.log"
        self.output = str(Path(spec.output.path).expanduser().absolute())
        self.state: dict = {}
        self._saved: tuple = ()
        self._old_term: Any = None

    def __enter__(self) -> "LocalRun":
        self.rec_dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        self.state = {"submission_id": self.sid, "target": "local", "state": "RUNNING",
                      "host": socket.gethostname(), "pid": pid, "pid_start": pid_start_time(pid),
                      "started_at": now(), "output": self.output, "overrides": list(self.overrides)}
        write_json_atomic(self.state_path, self.state)
        save_submission({"id": self.sid, "target": "local", "spec": str(Path(self.spec_path).absolute()),
                         "output": self.output, "record_dir": str(self.rec_dir), "host": self.state["host"],
                         "overrides": list(self.overrides), "spec_values": _spec_dict(self.spec)})
        log = open(self.log_path, "a", encoding="utf-8", errors="replace")
        args = shlex.join([self.spec_path, *(w for o in self.overrides for w in ("--set", o))])
        log.write(f"--- kscale submit {args} (pid {pid}, {self.state['started_at']})\n")
        self._saved = (sys.stdout, sys.stderr, log)
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        self._old_term = signal.signal(signal.SIGTERM, term_as_interrupt)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is KeyboardInterrupt:
            self.finish(130, stopped=True)
        elif exc_type is not None and not issubclass(exc_type, SystemExit):
            self.finish(1, message=f"{exc_type.__name__}: {exc}")
        self._restore()
        return False

    def finish(self, code: int, stopped: bool = False, message: str | None = None) -> None:
        if self.state.get("state") in FINAL_STATES:
            return
        final = "STOPPED" if stopped else ("SUCCEEDED" if code == 0 else "FAILED")
        if stopped:
            line = shards_line(mark_progress_stopped(self.output), self.output)  # the stage was interrupted mid-flight
            message = (f"{line}; rerun to resume" if line else "rerun to resume")
        self.state = {**self.state, "state": final, "exit_code": code, "ended_at": now(),
                      **({"message": message} if message else {})}
        write_json_atomic(self.state_path, self.state)
        if stopped:
            print(f"kscale: stopped: {message}", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        if self._saved:
            sys.stdout, sys.stderr, log = self._saved
            log.close()
            self._saved = ()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None


def term_as_interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM as Ctrl-C: the runner's ``finally`` (``ray.shutdown()``, the output lock) runs on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def _spec_dict(spec: Any) -> dict:
    """The spec's values as recorded (``cluster.env`` values redacted)."""
    import dataclasses

    from kscale.targets.records import redact_env

    return redact_env(dataclasses.asdict(spec)) if dataclasses.is_dataclass(spec) else {}


class LocalTarget(Target):
    """This machine (``kscale submit`` without a target): preflight checks, and status/logs/stop of the
    runs recorded by :class:`LocalRun`."""

    name = "local"
    errors = (RuntimeError,)

    def checks(self, spec: Any | None, spec_path: str | None, address: str | None) -> list:
        from kscale.targets.checks import check_local_gpus, check_ports

        return check_ports(spec) + check_local_gpus(spec)

    def _state(self, run: Run) -> dict | None:
        return read_json(run.rec_dir / f"{run.sid}.state.json") if run.rec_dir and run.sid else None

    def status(self, run: Run, address: str | None) -> dict | None:
        st = self._state(run)
        if st is None:
            return None
        state = st.get("state")
        if state == "RUNNING" and not driver_alive(st):
            state = "DIED"  # the driver was killed hard (SIGKILL, OOM) before it could record its end
        return {"status": state, "pid": st.get("pid"), "host": st.get("host"), "message": st.get("message")}

    def logs(self, run: Run, address: str | None, follow: bool, write: Callable[[str], None],
             err: Callable[[str], None]) -> int | None:
        if not run.rec_dir or not run.sid:
            return None
        log = run.rec_dir / f"{run.sid}.driver.log"
        if not log.is_file():
            return None
        with open(log, encoding="utf-8", errors="replace") as f:
            while True:
                chunk = f.read()
                if chunk:
                    write(chunk)
                if not follow:
                    return 0
                st = self._state(run) or {}
                if not chunk and (st.get("state") in FINAL_STATES or not driver_alive(st)):
                    rest = f.read()
                    if rest:
                        write(rest)
                    return 0
                time.sleep(0.5)

    def stop(self, run: Run, address: str | None, say: Callable[[str], None]) -> bool:
        st = self._state(run)
        if st is None:
            return False
        if st.get("state") in FINAL_STATES:
            say(f"kscale: {run.sid} already ended ({st['state']} at {st.get('ended_at')}); nothing to stop")
            return True
        if st.get("host") != socket.gethostname():
            raise RuntimeError(f"{run.sid} runs on {st.get('host')}; run `kscale stop` there")
        if not driver_alive(st):
            say(f"kscale: {run.sid}'s driver (pid {st.get('pid')}) is gone; nothing to stop")
            return True
        os.kill(int(st["pid"]), signal.SIGTERM)
        say(f"kscale: sent SIGTERM to {run.sid} (pid {st['pid']}); committed shards stay, rerun to resume")
        return True
