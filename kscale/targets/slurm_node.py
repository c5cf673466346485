"""The node side of a Slurm job: one long-lived service (a Ray head or worker, a dask scheduler or worker)
run inside its ``srun`` step by ``python -m kscale.targets.slurm_node``, so that the step ends cleanly.

The sbatch body (``kscale/templates/slurm/body.sh``) starts every service through this wrapper and stops it
by creating the service's *stop file* on the shared filesystem, never by signalling ``srun`` (a signalled
step ends with ``srun: error ... CANCELLED`` in the job's log). Asked to stop (stop file, or SIGTERM/SIGINT
from ``scancel`` or the time limit), the wrapper:

1. sends SIGTERM to the service's process group (Ray's processes stay in ``ray start``'s group), waits up to
   ``--grace`` seconds, then SIGKILLs the group and any process of this user still running from the
   node's temp dir (``--temp-dir``; gcs_server may ignore SIGTERM): processes whose arguments name that
   path as a whole path (``own_pids_using``; job 1234's dir never matches job 12345's), each re-checked
   against its recorded start time just before the signal (``kill_recorded``: a reused PID is left alone);
2. copies the node's Ray logs (``<temp-dir>/session_latest/logs``) to ``<logs-to>/<node>/`` (the Slurm node
   name: ``node_name``);
3. removes the node's temp dir and exits 0: the step and the job end without an error.

Before starting the service the wrapper creates the temp dir 0700 (``kscale.private.private_dir``) and
refuses, exit 1, one that already exists as a link, another user's or writable by others.

**One temp dir per node.** A step of several nodes (the Ray workers, the dask workers) runs the same command
on each, so the body cannot write each node's dir into it. It writes ``{node}`` in the temp dir's name
(``--temp-dir /tmp/kscale-c-12-ab34cd56-n{node}``, and the same text in the service's own arguments:
``ray start --temp-dir=...``); the wrapper replaces it, in ``--temp-dir`` and in every argument of the
command, with this node's index in the job's node list (``--job-nodes``, the body's ``scontrol show hostnames``;
0 is the head's node), found by Slurm's ``SLURMD_NODENAME``. On real nodes, which are different hosts, the
dirs would not collide anyway; several Slurm nodes on one host (``slurmd -N``, as in the tests) need it. The
service's output and logs go to ``<logs-to>/<node name>/`` for the same reason.

All of this runs inside the step, so it works after ``scancel`` too, when the allocation no longer admits a
new ``srun`` ("job has expired"). The service's own output (Ray's start-up banner with its "run ray stop"
advice, dask's log lines) goes to ``<logs-to>/<node>/<name>.out``, not to the job's log; if the service dies
on its own, the end of that file is printed to stderr and its exit code returned.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kscale.private import UnsafePath, private_dir
from kscale.targets.local import pid_start_time

POLL_S = 0.5
NODE = "{node}"  # in --temp-dir (and the command): this node's index in the job, filled in on the node
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a Slurm node name or short host name, as a path part


class NodeError(RuntimeError):
    """The wrapper cannot tell which node of the job it runs on (for a ``{node}`` temp dir)."""


def node_name() -> str:
    """The Slurm node this task runs on (``SLURMD_NODENAME``), else the short host name: the folder for this
    node's service output and Ray logs. Several Slurm nodes on one host have one host name, not one node name."""
    name = os.environ.get("SLURMD_NODENAME", "")
    return name if _NODE_NAME.match(name) else socket.gethostname().split(".")[0]


def node_index(job_nodes: list[str]) -> int:
    """This node's position in the job's node list (0: the head's node). ``SLURM_NODEID`` is no help: it
    counts the nodes of the *step*, and the Ray workers' step leaves out the head's node."""
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if name not in job_nodes:
        raise NodeError(f"this node ({name!r}, from SLURMD_NODENAME or the host name) is not in the job's node "
                        f"list {' '.join(job_nodes)!r}")
    return job_nodes.index(name)


def for_this_node(template: str, cmd: list[str], job_nodes: list[str]) -> tuple[str, list[str]]:
    """The temp dir ``template`` with ``{node}`` filled in for this node, and ``cmd`` with every occurrence of
    the template replaced by it. A template without ``{node}`` is returned as is, with ``cmd`` unchanged."""
    if NODE not in template:
        return template, cmd
    if not job_nodes:
        raise NodeError(f"--temp-dir {template!r} names {NODE} but no --job-nodes were given")
    path = template.replace(NODE, str(node_index(job_nodes)))
    return path, [arg.replace(template, path) for arg in cmd]


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _mentions(arg: str, path: str) -> bool:
    """True when ``path`` occurs in ``arg`` as a whole path: itself or a folder above what ``arg`` names,
    as the argument or after ``=`` / ``:`` / ``,`` (``--temp-dir=P``, ``--log-dir=P/logs``), never as the
    prefix of a longer name (``/tmp/kscale-x-1234`` is not in ``/tmp/kscale-x-12345``)."""
    return re.search(rf"(?:^|[=:,\s]){re.escape(path)}(?:$|[/:,\s])", arg) is not None


def own_pids_using(path: str) -> dict[int, str]:
    """This user's processes whose command line names ``path`` (whole path components): the service's
    processes that left its group, each with its start time (``/proc/PID/stat``) to check again before a
    signal. This process, its ancestors and ``srun`` clients (their arguments name the path) excluded."""
    uid, skip, found = os.getuid(), _ancestors(), {}
    path = path.rstrip("/") or "/"
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in skip:
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if d.stat().st_uid != uid or not any(_mentions(a, path) for a in argv) or Path(argv[0]).name == "srun":
                continue
        except OSError:
            continue
        start = pid_start_time(int(d.name))
        if start is not None:
            found[int(d.name)] = start
    return found


def kill_recorded(procs: dict[int, str], sig: int) -> list[int]:
    """Send ``sig`` to each recorded process that is still the one recorded (same start time): a PID the
    kernel gave to another process since the scan is left alone. Returns the PIDs signalled."""
    done = []
    for pid, start in procs.items():
        if pid_start_time(pid) != start:
            continue
        try:
            os.kill(pid, sig)
            done.append(pid)
        except ProcessLookupError:
            pass
    return done


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_service(proc: subprocess.Popen, grace_s: float, temp_dir: str | None) -> None:
    """SIGTERM the service's group, wait up to ``grace_s``, then SIGKILL the group and leftovers."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (proc.poll() is None or (temp_dir and own_pids_using(temp_dir))):
        time.sleep(POLL_S)
    _signal_group(proc.pid, signal.SIGKILL)
    if temp_dir:
        kill_recorded(own_pids_using(temp_dir), signal.SIGKILL)
    proc.wait()


def keep_logs(temp_dir: Path, dest: Path) -> None:
    """Copy the node's Ray session logs (if any) into ``dest``."""
    src = temp_dir / "session_latest" / "logs"
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=True, ignore_dangling_symlinks=True)


def run(name: str, cmd: list[str], stop_file: Path, logs_to: Path, temp_dir: Path | None, grace_s: float) -> int:
    host_dir = logs_to / node_name()
    host_dir.mkdir(parents=True, exist_ok=True)
    out_path = host_dir / f"{name}.out"
    asked: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _f: asked.append(signum))
    if temp_dir is not None:
        try:
            private_dir(temp_dir)  # a predictable /tmp name: refuse one another user made or linked first
        except UnsafePath as e:
            print(f"kscale: {name} on {socket.gethostname()}: {e}", file=sys.stderr, flush=True)
            return 1
    with open(out_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        while proc.poll() is None and not asked and not stop_file.exists():
            time.sleep(POLL_S)
        died_alone = proc.poll() is not None and not asked and not stop_file.exists()
        stop_service(proc, grace_s, str(temp_dir) if temp_dir else None)
    if temp_dir is not None and not temp_dir.is_symlink():
        keep_logs(temp_dir, host_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    if died_alone:
        tail = out_path.read_text(errors="replace").splitlines()[-30:]
        print(f"kscale: {name} on {socket.gethostname()} exited by itself ({proc.returncode}); the end of "
              f"{out_path}:\n" + "\n".join(tail), file=sys.stderr, flush=True)
        return proc.returncode or 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kscale.targets.slurm_node", description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="the service: ray-head, ray-worker, dask-scheduler, dask-worker")
    ap.add_argument("--stop-file", required=True, help="stop when this file exists (shared filesystem)")
    ap.add_argument("--logs-to", required=True, help="folder for <node>/<name>.out and the node's Ray logs")
    ap.add_argument("--temp-dir", default=None, help="the node-local temp dir: logs kept, then removed; "
                    f"{NODE} in it (and in the command) is this node's index in --job-nodes")
    ap.add_argument("--job-nodes", default="", help="the job's nodes, in order, separated by spaces")
    ap.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND...")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command after --")
    temp_dir = None
    if a.temp_dir:
        try:
            resolved, cmd = for_this_node(a.temp_dir, cmd, a.job_nodes.split())
        except NodeError as e:
            print(f"kscale: {a.name} on {socket.gethostname()}: {e}", file=sys.stderr, flush=True)
            return 1
        temp_dir = Path(resolved)
    return run(a.name, cmd, Path(a.stop_file), Path(a.logs_to), temp_dir, a.grace)


if __name__ == "__main__":
    sys.exit(main())
