"""The head of the Ray cluster lost mid-extraction: the driver fails with a clear message, a rerun resumes.

A Ray head of our own (``ray start --head --block``, own HOME with its auth token, own temp dir, loopback, ports
outside Ray's worker range, its own process group) and the real CLI as the driver on this machine, joined to it
through ``RAY_ADDRESS=127.0.0.1:PORT`` (``kscale submit`` runs the driver here and joins that cluster). Once the
first shard is committed the test SIGKILLs the head's process group (and any process under its temp dir, by
PID): ``kscale submit`` must exit with status 2 and :class:`kscale.executors.ray.RayHeadLost`'s message, no
traceback and before Ray's own 60 s GCS timeout would end the driver with a raw log line. A rerun on a new head
resumes (the committed shards are skipped) and the store equals an uninterrupted in-process run byte for byte.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.cluster.helpers import VENV_BIN, clean_env, free_port_block, kscale, own_pids
from tests.conftest import extract_spec
from tests.integration.test_extract import stores_equal

pytestmark = pytest.mark.slow  # two heads started and two extraction runs: ~1-2 min

DATA = {"source": "generated", "generated": {"n_samples": 16, "image_size": 56}, "shard_size": 2}  # 8 shards
MODEL = {"path": "debug:qwen2_5_vl", "dtype": "float32", "device": "cpu"}
EXTRACT = {"batch_size": 1, "key_dtype": "float16"}


class Head:
    """One ``ray start --head --block`` of ours: ``gcs`` (host:port), ``kill()`` by process group and PIDs."""

    def __init__(self, root: Path, env: dict):
        self.temp_dir = tempfile.mkdtemp(prefix="kh-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        base = free_port_block(10)
        self.gcs = f"127.0.0.1:{base}"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2",
               "--num-gpus=0", f"--port={base}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
               f"--ray-client-server-port={base + 2}", f"--node-manager-port={base + 3}",
               f"--object-manager-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}",
               f"--dashboard-agent-listen-port={base + 6}", f"--metrics-export-port={base + 7}",
               f"--runtime-env-agent-port={base + 8}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self.log = root / f"head-{base}.log"
        # every process of this head (gcs_server, raylet, its Ray workers) inherits the marker: ours, by PID
        self.marker = f"KSCALE_TEST_HEAD={self.temp_dir}"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env={**env, "KSCALE_TEST_HEAD": self.temp_dir}, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(base, base + 3)

    def _wait(self, *ports: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ray head exited:\n{self.log.read_text()[-3000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"ray head did not listen on {port}:\n{self.log.read_text()[-3000:]}")
                    time.sleep(0.3)

    def pids(self) -> list[int]:
        """This head's processes: those whose environment carries its marker (Ray workers rename their
        command line, so the temp dir is not always in it), and those with the temp dir on the command line."""
        found = set(own_pids(self.temp_dir))
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if self.marker.encode() in (d / "environ").read_bytes().split(b"\0"):
                        found.add(int(d.name))
                except OSError:
                    continue
        return sorted(found)

    def kill(self) -> None:
        """The head machine dies: SIGKILL its process group and every process of it (its Ray workers too)."""
        pids = self.pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        for _ in range(3):
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def env(tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    e = clean_env(home, tmp_path / "kscale-home")
    # token auth as Ray sets it up by default (the driver reads the token from the same HOME); loopback only
    e.update(RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=e, check=True,
                   capture_output=True, timeout=60)
    return e


def job(path: Path, executor: str) -> dict:
    d = extract_spec(path, data=DATA, extract=EXTRACT,
                     resources={"executor": executor, "workers": 1, "cpus_per_worker": 1})
    d["model"] = MODEL
    return d


def test_head_killed_mid_extract_fails_clearly_and_a_rerun_resumes_to_the_same_store(tmp_path, env):
    reference = spec_from_dict(job(tmp_path / "ref", "local"))
    run_job(reference, show_bar=False)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job(tmp_path / "run", "ray")))
    store = tmp_path / "run" / "store"
    heads = [Head(tmp_path, env)]
    try:
        err_path = tmp_path / "driver.err"
        with open(err_path, "w") as err:
            driver = subprocess.Popen([sys.executable, "-m", "kscale.cli", "submit", str(spec_file), "--no-progress"],
                                      env={**env, "RAY_ADDRESS": heads[0].gcs}, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=err, text=True)
            deadline = time.monotonic() + 240
            while not list((store / "shards").glob("*.done.json")) and driver.poll() is None:
                assert time.monotonic() < deadline, "no shard was committed in 240 s"
                time.sleep(0.1)
            assert driver.poll() is None, f"the driver ended before the head was killed:\n{err_path.read_text()}"
            heads[0].kill()
            t_kill = time.monotonic()
            try:
                driver.wait(timeout=120)
            except subprocess.TimeoutExpired:
                driver.kill()
                pytest.fail(f"the driver still runs 120 s after the head was killed:\n{err_path.read_text()[-3000:]}")
        waited = time.monotonic() - t_kill
        stderr = err_path.read_text()
        done_before = len(list((store / "shards").glob("*.done.json")))
        assert driver.returncode == 2, (driver.returncode, stderr[-3000:])
        assert "kscale submit: RayHeadLost: lost the Ray cluster's head" in stderr, stderr[-3000:]
        assert f"of 8 shards are committed in {store}" in stderr and "rerun the same job to resume" in stderr
        assert "Traceback" not in stderr, stderr[-3000:]
        assert waited < 55, waited  # ours, not Ray's "Failed to connect to GCS within 60 seconds"
        assert 1 <= done_before < 8, done_before

        heads.append(Head(tmp_path, env))  # the cluster started again (a new head)
        rerun = kscale(["submit", str(spec_file), "--no-progress"], {**env, "RAY_ADDRESS": heads[1].gcs}, tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        m = re.search(r"(\d+) skipped", rerun.stdout + rerun.stderr)
        assert m and int(m.group(1)) == done_before, (rerun.stdout, rerun.stderr[-2000:])
        stores_equal(reference.output.path, str(store))
    finally:
        for h in heads:
            h.kill()
