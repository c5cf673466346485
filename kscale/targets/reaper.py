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


def _ray_tree(driver_pid: int, known: dict[int, float]) -> dict[int, float]:
    """``known`` plus, from one scan of the process table: the driver's Ray children, and every process below
    them or below a ``known`` process that is still the one we recorded (Ray's head processes die with the
    driver, so the agents and workers they started are found through ``known``, not through the driver)."""
    import psutil

    kids: dict[int, list[int]] = {}
    created: dict[int, float] = {}
    for p in psutil.process_iter(["ppid", "create_time"]):
        kids.setdefault(p.info["ppid"], []).append(p.pid)
        created[p.pid] = p.info["create_time"] or 0.0
    out = dict(known)
    roots = [pid for pid, c in known.items() if abs(created.get(pid, -1.0) - c) < 0.01]
    for pid in kids.get(driver_pid, []):
        if pid != os.getpid() and pid not in out:
            try:
                if _is_ray(psutil.Process(pid)):
                    roots.append(pid)
            except psutil.Error:
                pass
    while roots:
        pid = roots.pop()
        if pid in created:
            out[pid] = created[pid]
            roots.extend(k for k in kids.get(pid, []) if k not in out)
    return out


def _alive(pid: int, created: float):
    import psutil

    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def watch(driver_pid: int, grace_s: float, poll_s: float = 0.25) -> None:
    """Follow the driver's Ray tree until our stdin closes or the driver is gone; then reap that tree."""
    import psutil

    try:
        driver_created = psutil.Process(driver_pid).create_time()
    except psutil.Error:
        return
    known: dict[int, float] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], poll_s)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone or done with Ray
        known = _ray_tree(driver_pid, known)
        if _alive(driver_pid, driver_created) is None:
            break
    known = _ray_tree(driver_pid, known)  # still valid when the driver only closed the pipe
    if _alive(driver_pid, driver_created) is not None:  # a clean ray.shutdown(): let Ray's processes exit
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p, c) for p, c in known.items()):
            time.sleep(0.2)
    for sig_kill in (False, True):
        known = _ray_tree(driver_pid, known)  # what the dying tree started meanwhile
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
