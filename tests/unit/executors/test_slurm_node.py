"""The node-side wrapper of a Slurm job's services (``kscale.targets.slurm_node``), run as the sbatch body runs
it, without Slurm: a stand-in service that prints Ray's banner, writes "Ray logs" into its temp dir and starts a
child. Asked to stop (stop file or SIGTERM), the wrapper ends the service and its child, keeps the logs, removes
the temp dir and exits 0 with nothing on its own output; a service that dies alone is reported with its exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

# A service like `ray start --block`: banner, logs under TEMP/session_latest/logs, a child that keeps running,
# exits at once when its first argument says so.
SERVICE = """
import os, subprocess, sys, time
temp = sys.argv[1]
logs = os.path.join(temp, "session_latest", "logs")
os.makedirs(logs, exist_ok=True)
open(os.path.join(logs, "raylet.out"), "w").write("raylet log\\n")
print("Ray runtime started. To terminate the Ray runtime, run\\n  ray stop", flush=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", temp])
if sys.argv[2] == "die":
    sys.exit(3)
time.sleep(600)
"""


def _start(tmp_path: Path, mode: str = "serve") -> tuple[subprocess.Popen, Path, Path, Path]:
    temp, logs, stop = tmp_path / "node-tmp", tmp_path / "logs", tmp_path / "stop" / "ray-head"
    stop.parent.mkdir()
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    proc = subprocess.Popen([sys.executable, "-m", "kscale.targets.slurm_node", "--name", "ray-head",
                             "--stop-file", str(stop), "--logs-to", str(logs), "--temp-dir", str(temp),
                             "--grace", "5", "--", sys.executable, str(script), str(temp), mode],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (temp / "session_latest" / "logs" / "raylet.out").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc, temp, logs, stop


def _using(path: Path) -> list[int]:
    from kscale.targets.slurm_node import own_pids_using

    return own_pids_using(str(path))


def _assert_clean_end(proc: subprocess.Popen, temp: Path, logs: Path) -> None:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "" and err == "", (out, err)  # the banner is not in the job's log ...
    host = logs / socket.gethostname().split(".")[0]
    assert "ray stop" in (host / "ray-head.out").read_text()  # ... but in the service's output file
    assert (host / "raylet.out").read_text() == "raylet log\n"  # the node's Ray logs are kept
    assert not temp.exists()  # the node's temp dir is removed
    assert not _using(temp)  # the service and the child it started are gone


def test_stop_file_ends_the_service_cleanly(tmp_path):
    proc, temp, logs, stop = _start(tmp_path)
    assert _using(temp), "the stand-in service did not start"
    stop.touch()
    _assert_clean_end(proc, temp, logs)


def test_sigterm_as_from_scancel_ends_the_service_cleanly(tmp_path):
    proc, temp, logs, _ = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _assert_clean_end(proc, temp, logs)


def test_a_service_that_dies_alone_is_reported(tmp_path):
    proc, temp, logs, _ = _start(tmp_path, mode="die")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert "ray-head on" in err and "exited by itself (3)" in err and "ray stop" in err
    assert not temp.exists() and not _using(temp)


# ----------------------------------------------------------------------------- issue 21 item 5: whose PIDs


def _sleeper(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *args])


def test_own_pids_match_whole_paths_not_prefixes(tmp_path):
    """The temp dir of job 1234 is a prefix of job 12345's: only processes naming the path itself (or a file
    under it) are this service's."""
    mine, other = str(tmp_path / "kscale-slurm-1234"), str(tmp_path / "kscale-slurm-12345")
    procs = {"other-arg": _sleeper(other), "other-opt": _sleeper(f"--temp-dir={other}"),
             "other-file": _sleeper(f"--log-dir={other}/session_latest"),
             "mine-arg": _sleeper(mine), "mine-opt": _sleeper(f"--temp-dir={mine}"),
             "mine-file": _sleeper(f"--raylet-name={mine}/sockets/raylet")}
    try:
        time.sleep(0.3)
        found = _using(Path(mine))
        for name, p in procs.items():
            assert (p.pid in found) == name.startswith("mine"), name
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_a_pid_is_signalled_only_while_it_is_the_recorded_process(tmp_path):
    from kscale.targets.slurm_node import kill_recorded

    p = _sleeper(str(tmp_path / "kscale-slurm-1"))
    try:
        time.sleep(0.2)
        (start,) = _using(tmp_path / "kscale-slurm-1").values()
        assert kill_recorded({p.pid: str(int(start) + 1)}, signal.SIGKILL) == []  # the PID now names another process
        time.sleep(0.2)
        assert p.poll() is None, "a process that is not the recorded one was killed"
        assert kill_recorded({p.pid: start}, signal.SIGKILL) == [p.pid]
        assert p.wait(timeout=10) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


# ----------------------------------------------------------------------------- issue 26: nodes sharing a host


def _start_on(tmp_path: Path, node: str, job_nodes: str) -> subprocess.Popen:
    """The wrapper as one task of a multi-node step: Slurm node ``node`` of a job on ``job_nodes``, the temp dir
    named with ``{node}`` in ``--temp-dir`` and in the service's own argument (as body.sh passes ``ray start
    --temp-dir=...``)."""
    template = str(tmp_path / "kscale-c-7-abcd-n{node}")
    (tmp_path / "stop").mkdir(exist_ok=True)
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    return subprocess.Popen([sys.executable, "-m", "kscale.targets.slurm_node", "--name", "ray-worker",
                             "--stop-file", str(tmp_path / "stop" / node), "--logs-to", str(tmp_path / "logs"),
                             "--temp-dir", template, "--job-nodes", job_nodes, "--grace", "5", "--",
                             sys.executable, str(script), template, "serve"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "SLURMD_NODENAME": node},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_nodes_sharing_a_host_get_their_own_temp_dir_and_log_folder(tmp_path):
    """Two Slurm nodes on one host (``slurmd -N``), one step: each task's wrapper fills ``{node}`` with its
    node's index in the job, so the two services run in two temp dirs (each removed by its own wrapper) and
    their output and Ray logs land in one folder per node name, not one per host."""
    procs = {node: _start_on(tmp_path, node, "kn1 kn2") for node in ("kn1", "kn2")}
    temps = {"kn1": tmp_path / "kscale-c-7-abcd-n0", "kn2": tmp_path / "kscale-c-7-abcd-n1"}
    deadline = time.monotonic() + 30
    while not all((t / "session_latest" / "logs" / "raylet.out").exists() for t in temps.values()):
        assert time.monotonic() < deadline, list(tmp_path.iterdir())
        time.sleep(0.1)
    assert all(_using(t) for t in temps.values())  # each service named its own dir, not the template
    for node in ("kn2", "kn1"):
        (tmp_path / "stop" / node).touch()
        out, err = procs[node].communicate(timeout=30)
        assert procs[node].returncode == 0 and out == err == "", (node, out, err)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["kn1", "kn2"]
    for node, temp in temps.items():
        assert (tmp_path / "logs" / node / "raylet.out").read_text() == "raylet log\n"
        assert "ray stop" in (tmp_path / "logs" / node / "ray-worker.out").read_text()
        assert not temp.exists() and not _using(temp)
    assert not list(tmp_path.glob("*{node}*"))


def test_a_node_outside_the_job_list_is_refused(tmp_path):
    proc = _start_on(tmp_path, "kn3", "kn1 kn2")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "'kn3'" in err and "kn1 kn2" in err, err
    assert not list(tmp_path.glob("kscale-c-7-*"))  # nothing started, no temp dir made


def test_node_index_fills_the_template_and_the_command(monkeypatch):
    from kscale.targets.slurm_node import for_this_node

    monkeypatch.setenv("SLURMD_NODENAME", "b")
    path, cmd = for_this_node("/t/k-n{node}", ["ray", "--temp-dir=/t/k-n{node}", "/t/k-n{node}/x", "{node}"],
                              ["a", "b", "c"])
    assert path == "/t/k-n1" and cmd == ["ray", "--temp-dir=/t/k-n1", "/t/k-n1/x", "{node}"]
    assert for_this_node("/t/k", ["ray", "/t/k"], []) == ("/t/k", ["ray", "/t/k"])  # no {node}: as before
