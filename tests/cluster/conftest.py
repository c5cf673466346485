"""Fixtures that start real cluster software for the `cluster` tests, and stop it by PID.

- ``ray_head``: a Ray head of our own (own HOME with its auth token, own temp dir, own ports outside Ray's
  worker range 10002-19999, the venv first on PATH as on a real cluster), stopped through its process
  group: never ``ray stop``, which would kill every Ray on the machine.
- ``slurm``: a private single-node Slurm (munged, slurmctld, slurmd) from ``.ci/start_slurm.sh``, with its
  own config, ports and first job id; skipped with a clear message where Slurm is not installed.
  ``slurm_two_nodes``: the same with two nodes on this host, each its own ``slurmd -N`` on its own port.

Every test in this folder is marked ``cluster``. They run by default (``-m 'not gpu and not slow'``) and
take seconds once the software is installed (``.ci/install_slurm.sh``), plus the demo job itself.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.helpers import REPO, VENV_BIN, clean_env, free_port_block, own_pids
from tests.testing_utils import SLURM_INSTALL, require, require_binaries

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@dataclass
class Head:
    url: str
    env: dict          # HOME with the token, KSCALE_HOME, PATH: for CLI calls against this head
    temp_dir: str
    proc: subprocess.Popen
    start_s: float


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Head:
    root = tmp_path_factory.mktemp("ray-head")
    home = root / "home"
    home.mkdir()
    env = clean_env(home, root / "kscale-home")
    env.update(RAY_AUTH_MODE="token", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    temp_dir = tempfile.mkdtemp(prefix="kt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    base = free_port_block(10)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2",
           f"--port={base}", "--dashboard-host=127.0.0.1", f"--dashboard-port={base + 1}",
           f"--ray-client-server-port={base + 2}", f"--node-manager-port={base + 3}",
           f"--object-manager-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}",
           f"--dashboard-agent-listen-port={base + 6}", f"--metrics-export-port={base + 7}",
           f"--runtime-env-agent-port={base + 8}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    t0 = time.monotonic()
    log_path = root / "head.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{base + 1}"
            _wait_for_jobs_api(url, proc, log_path)
            yield Head(url, env, temp_dir, proc, time.monotonic() - t0)
        finally:
            _stop_process_group(proc, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ray head at {url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop_process_group(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM our head's process group, then SIGKILL what is left of it (gcs_server may need it)."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (proc.poll() is None or own_pids(marker)):
            time.sleep(0.2)
        if proc.poll() is not None and not own_pids(marker):
            return
    for pid in own_pids(marker):  # started by our head but in another group: still ours, by PID
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def slurm() -> dict:
    yield from _private_slurm(nodes=1)


@pytest.fixture(scope="module")
def slurm_two_nodes() -> dict:
    """Two Slurm nodes on this host (``kscale-n1``, ``kscale-n2``): one slurmd each (``slurmd -N``), own port."""
    yield from _private_slurm(nodes=2)


def _private_slurm(nodes: int):
    require_binaries("slurmctld", "slurmd", "sbatch", "munged", install=SLURM_INSTALL)
    require(os.geteuid() == 0, "the private Slurm needs root (munged runs as user munge)",
            "run the cluster tests as root")
    state = Path(tempfile.mkdtemp(prefix="kscale-slurm-", dir="/tmp"))  # pytest's tmp is 0700: munge can't enter
    state.chmod(0o755)
    script = REPO / ".ci" / "start_slurm.sh"
    ports = [str(free_port_block(1)), str(free_port_block(nodes))]
    first_id = str(random.randrange(1000, 900000))
    p = subprocess.run(["bash", str(script), "start", str(state), *ports, first_id, str(nodes)],
                       capture_output=True, text=True, timeout=90)
    try:
        if p.returncode != 0:
            logs = "\n".join(f.read_text()[-1500:] for f in (state / "log").glob("*.log"))
            pytest.fail(f"could not start Slurm: {p.stderr}\n{logs}")
        yield {"SLURM_CONF": str(state / "slurm.conf"), "state": str(state)}
    finally:
        subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
