"""The embedded-Ray watchdog (``kscale.targets.reaper``) on a process tree of our own, no Ray.

A "driver" process starts the reaper, then a stand-in raylet (a Python process whose script lies under a
``ray/`` folder, which the reaper takes for Ray's code). Once the reaper has seen it, the raylet starts an
"agent" with ``RAY_RAYLET_PID`` set to its pid (as Ray's raylet does) and exits at once: the agent is
orphaned before a poll could see it under the raylet, and it holds no Ray session file. That is the race
of ``tests/integration/test_local_runs.py::test_killed_driver_leaves_no_ray_behind``, where a
``ray::RuntimeEnvAgent`` outlived the driver's SIGKILL by more than 10 s. The test SIGKILLs the driver and
expects the agent gone within seconds; an unrelated process with another ``RAY_RAYLET_PID`` is left alone.
Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.testing_utils import process_gone

RAYLET = """
import os, subprocess, sys, time
time.sleep(1.5)  # the reaper polls every 0.25 s: it has seen this process by now
env = dict(os.environ, RAY_RAYLET_PID=str(os.getpid()))
agent = subprocess.Popen([sys.executable, sys.argv[1]], env=env, start_new_session=True)
open(sys.argv[2], "w").write(str(agent.pid))
os._exit(0)  # orphan the agent at once
"""

AGENT = "import time\ntime.sleep(120)\n"

DRIVER = """
import subprocess, sys, time
from kscale.targets.reaper import start_reaper
start_reaper()
subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2], sys.argv[3]])
time.sleep(120)
"""


def _wait_file(path: Path, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} not written")


def test_an_agent_orphaned_before_a_poll_saw_it_is_reaped_by_its_raylet_pid(tmp_path) -> None:
    ray = tmp_path / "ray"
    ray.mkdir()
    (ray / "raylet.py").write_text(RAYLET)
    (ray / "agent.py").write_text(AGENT)
    (tmp_path / "driver.py").write_text(DRIVER)
    # a bystander: another "raylet"'s agent (RAY_RAYLET_PID of a process outside the driver's tree)
    bystander = subprocess.Popen([sys.executable, str(ray / "agent.py")],
                                 env=dict(os.environ, RAY_RAYLET_PID=str(os.getpid())))
    agent_file = tmp_path / "agent.pid"
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(ray / "raylet.py"),
                               str(ray / "agent.py"), str(agent_file)], env=dict(os.environ, PYTHONPATH=os.getcwd()))
    agent = None
    try:
        agent = _wait_file(agent_file)
        p = psutil.Process(agent)
        assert p.ppid() != driver.pid and p.environ()["RAY_RAYLET_PID"] != str(driver.pid)
        time.sleep(0.5)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert process_gone(agent, 8), "the orphaned agent outlived the driver's SIGKILL by 8 s"
        assert bystander.poll() is None, "the reaper killed a process outside the driver's Ray tree"
    finally:
        for pid in (agent, driver.pid, bystander.pid):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        driver.wait()
        bystander.wait()
