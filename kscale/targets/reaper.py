"""A watchdog for embedded local Ray: when the driver dies, its Ray processes die within seconds.

Ray's head processes (GCS, raylet, dashboard and its agents) and workers are all descendants of the driver
that called ``ray.init()``; killed hard (SIGKILL, OOM), the driver takes GCS, raylet and dashboard with it
(Ray's own fate sharing) but leaves the raylet's agents and workers running for a minute or more.
:func:`kscale.runner.ray_session` calls ``start_reaper()`` *before* an embedded ``ray.init`` (a driver killed
while Ray starts is covered too); it starts ``python -m kscale.targets.reaper PID``, which keeps a list of the
driver's Ray processes and everything below them (pid and creation time, one scan of the process table every
0.25 s) and learns the Ray session folder (``.../session_<date>_<PID>``) from the head's arguments. As soon
as its stdin pipe from the driver closes (the driver died, or shut Ray down and called :func:`stop_reaper`)
it adds the Ray processes holding a file of that session open (orphans started after the last scan inherit
the raylet's log file) and those whose ``RAY_RAYLET_PID`` names a process of the tree, gives the list ``grace_s`` to exit if the driver still lives (none if it died), then
SIGTERMs and finally SIGKILLs those still there. Each pid is checked against its recorded creation time, so
a reused pid is never touched, and nothing outside this driver's tree or session is.
"""

from __future__ import annotations

import os
import re
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
        return p.name() in ("gcs_server", "raylet") or p.name().startswith(("ray::", "ray-dashboard-")) or any(
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


def _session_dir(driver_pid: int, known: dict[int, float]) -> str | None:
    """The embedded Ray's session folder, ``.../session_<date>_<driver pid>``, from a head process's arguments."""
    import psutil

    pattern = re.compile(rf"(/\S*?/session_[0-9_-]+_{driver_pid})(?:/|$)")
    for pid, created in known.items():
        p = _alive(pid, created)
        try:
            found = [m.group(1) for m in map(pattern.search, p.cmdline() if p else []) if m]
        except psutil.Error:
            continue
        if found:
            return found[0]
    return None


def _session_members(session: str, since: float) -> dict[int, float]:
    """Ray processes started since ``since`` that hold a file of ``session`` open (workers and agents inherit
    the raylet's log file): the orphans of a raylet that died with the driver before a poll saw them."""
    import psutil

    out: dict[int, float] = {}
    for p in psutil.process_iter(["create_time"]):
        created = p.info["create_time"] or 0.0
        if created < since - 0.05 or p.pid == os.getpid():
            continue
        try:
            if _is_ray(p) and any(f.path.startswith(session + "/") for f in p.open_files()):
                out[p.pid] = created
        except psutil.Error:
            pass
    return out


def _raylet_orphans(known: dict[int, float], since: float) -> dict[int, float]:
    """Ray processes started since ``since`` whose ``RAY_RAYLET_PID`` (Ray sets it in every agent and worker
    the raylet starts) names a process of ``known`` created before them: an agent the raylet started just
    before it died with the driver, orphaned before a poll saw it and before it opened a session file (seen:
    ``ray::RuntimeEnvAgent`` alive 10 s after the driver's SIGKILL)."""
    import psutil

    out: dict[int, float] = {}
    for p in psutil.process_iter(["create_time"]):
        created = p.info["create_time"] or 0.0
        if created < since - 0.05 or p.pid == os.getpid() or p.pid in known:
            continue
        try:
            parent = int(p.environ().get("RAY_RAYLET_PID", "-1"))
            if parent in known and known[parent] <= created + 0.01 and _is_ray(p):
                out[p.pid] = created
        except (psutil.Error, ValueError):
            pass
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
    session = None
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], poll_s)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone or done with Ray
        known = _ray_tree(driver_pid, known)
        session = session or _session_dir(driver_pid, known)
        if _alive(driver_pid, driver_created) is None:
            break
    known = _ray_tree(driver_pid, known)  # still valid when the driver only closed the pipe
    if _alive(driver_pid, driver_created) is not None:  # a clean ray.shutdown(): let Ray's processes exit
        _wait_gone(known, grace_s)
    for sig_kill in (False, True):
        known = _ray_tree(driver_pid, known)  # what the dying tree started meanwhile
        if session:
            known = {**_session_members(session, driver_created), **known}
        known = {**_raylet_orphans(known, driver_created), **known}
        left = [p for p in (_alive(p, c) for p, c in known.items()) if p is not None]
        for p in left:
            try:
                p.kill() if sig_kill else p.terminate()
            except psutil.Error:
                pass
        if not left:
            return
        _wait_gone(known, 2.0)


def _wait_gone(known: dict[int, float], timeout: float) -> None:
    """Wait until every process of ``known`` has exited; a zombie (dead, not yet reaped by its new parent)
    counts as gone, where ``psutil.wait_procs`` would wait for the reaping."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p, c) for p, c in known.items()):
        time.sleep(0.1)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 2.0)
