"""A watchdog for embedded local Ray: when the driver dies, its Ray processes die within seconds.

Ray's head processes (GCS, raylet, dashboard and its agents) and workers are all descendants of the driver
that called ``ray.init()``; killed hard (SIGKILL, OOM), the driver leaves them running for a minute or more.
``start_reaper()`` (called by :func:`kscale.runner.ray_session` after an embedded ``ray.init``) starts
``python -m kscale.targets.reaper PID``, which keeps a fresh list of the driver's descendants (pid and
creation time, refreshed every 0.5 s) and, as soon as its stdin pipe from the driver closes (the driver
died, or shut Ray down and called :func:`stop_reaper`), gives them ``grace_s`` to exit, then SIGTERMs and
finally SIGKILLs those still there. Only Ray processes (and what they started) of that list are signalled, each checked against its
recorded creation time, so a reused pid is never touched, and nothing outside this driver's tree is.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time


def start_reaper(grace_s: float = 2.0) -> subprocess.Popen:
    """Start the watchdog for this process's descendants (its stdin is our lifeline)."""
    return subprocess.Popen([sys.executable, "-m", "kscale.targets.reaper", str(os.getpid()), str(grace_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # Ctrl-C on the terminal does not reach it


def stop_reaper(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """After ``ray.shutdown()``: let the watchdog reap what Ray left behind, and wait for it."""
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()


def _is_ray(p) -> bool:
    """A Ray process: gcs_server, raylet, or a Python process running Ray's own code."""
    import psutil

    try:
        return p.name() in ("gcs_server", "raylet") or p.name().startswith("ray::") or any(
            "/ray/" in a for a in p.cmdline()[:3])
    except psutil.Error:
        return False


def _descendants(parent) -> dict[int, float]:
    """Ray processes among the driver's children, and everything below them (workers, agents)."""
    import psutil

    out: dict[int, float] = {}
    try:
        for child in parent.children():
            if child.pid == os.getpid() or not _is_ray(child):
                continue
            for p in [child, *child.children(recursive=True)]:
                out[p.pid] = p.create_time()
    except psutil.Error:
        pass
    return out


def _alive(pid: int, created: float):
    import psutil

    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def watch(driver_pid: int, grace_s: float) -> None:
    import psutil

    try:
        parent = psutil.Process(driver_pid)
    except psutil.Error:
        return
    known: dict[int, float] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone or done with Ray
        known.update(_descendants(parent))
        if not parent.is_running():
            break
    known.update(_descendants(parent))  # still valid when the driver only closed the pipe
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(p, c) for p, c in known.items()):
        time.sleep(0.2)
    for sig_kill in (False, True):
        left = [p for p in (_alive(p, c) for p, c in known.items()) if p is not None]
        for p in left:
            try:
                p.kill() if sig_kill else p.terminate()
            except psutil.Error:
                pass
        if not left:
            return
        psutil.wait_procs(left, timeout=2.0)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 2.0)
