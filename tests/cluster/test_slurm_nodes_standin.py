"""``cluster.slurm.nodes: 2`` without a second host: the node side of the sbatch body run as Slurm runs it on
two nodes, each service under ``python -m kscale.targets.slurm_node`` (what every ``srun`` step of
``kscale/templates/slurm/body.sh`` runs).

Why a stand-in and not ``sbatch --nodes=2``: this machine's Slurm 22.05 does run two ``slurmd -N`` nodes on
one host (``srun -N2`` ran a task on each), but the body gives every node of a job the same Ray ports
(``port_base`` + 0..8) and the same node-local temp dir, which is right on real nodes (different hosts) and
collides when two nodes share one host: the second Ray node cannot bind its ports and its wrapper refuses the
temp dir the first one created. Here each "node" has its own port block and temp dir, everything else is the
body's: the Ray head started first (``ray start --head --block`` with the job's token auth) and waited for,
the worker node joining its GCS, ``python -m kscale.targets.slurm wait-ray --nodes 2``, the driver through
``python -m kscale.targets.records driver`` with ``RAY_ADDRESS`` (``kscale submit`` joining the cluster),
then the services stopped through their stop files, newest first. Loopback only; every process is ours, by
PID (the wrappers' process groups).

Proves: the driver's workers are placed one on each node (the GCS's actor table) and commit every shard, the
store equals the in-process run byte for byte, the driver records SUCCEEDED, and each wrapper ends 0 after its
stop file, with the node's Ray logs kept and its temp dir removed.
"""

from __future__ import annotations

import json
import os
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
from tests.cluster.helpers import clean_env, free_port_block
from tests.conftest import extract_spec
from tests.integration.test_extract import stores_equal

pytestmark = pytest.mark.slow  # two Ray nodes and an extraction across them: ~1-2 min

DATA = {"source": "generated", "generated": {"n_samples": 12, "image_size": 56}, "shard_size": 2}  # 6 shards
MODEL = {"path": "debug:qwen2_5_vl", "dtype": "float32", "device": "cpu"}
EXTRACT = {"batch_size": 1, "key_dtype": "float16"}
# one worker per node: each node declares 1 GPU (body.sh passes Slurm's count) and each worker takes one
RESOURCES = {"executor": "ray", "workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 0.5}


# ``ray start`` for the worker node. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps every Ray process
# of this test on 127.0.0.1) the CLI refuses ``--address``; this gives the CLI module alone a view of Ray's
# constants where the switch is on, so only that check is skipped: address resolution (Ray's ``services``)
# still sees it off and the node's processes bind to loopback. On a real cluster: plain
# ``ray start --address=...``, as body.sh runs it.
JOIN = [sys.executable, "-c", """
import sys, types
from ray._private import ray_constants
import ray.scripts.scripts as cli

class View(types.ModuleType):
    def __getattr__(self, name):
        return getattr(ray_constants, name)

view = View("ray_constants_view")
view.ENABLE_RAY_CLUSTER = True
cli.ray_constants = view
sys.exit(cli.main())
""", "start"]


def ray_ports(base: int) -> list[str]:
    """body.sh's ``ray_ports`` for a port block starting at ``base``."""
    return [f"--node-manager-port={base + 3}", f"--object-manager-port={base + 4}",
            f"--dashboard-agent-grpc-port={base + 5}", f"--dashboard-agent-listen-port={base + 6}",
            f"--metrics-export-port={base + 7}", f"--runtime-env-agent-port={base + 8}"]


class Services:
    """The wrappers this test started, in start order, each a ``slurm_node`` process in its own group."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.stop_dir = root / "stop"
        self.stop_dir.mkdir()
        self.logs = root / "logs"
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, temp_dir: Path, cmd: list[str]) -> subprocess.Popen:
        out = open(self.root / f"{name}.step.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "kscale.targets.slurm_node", "--name", name, "--stop-file",
                              str(self.stop_dir / name), "--logs-to", str(self.logs), "--temp-dir", str(temp_dir),
                              "--", *cmd], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append((name, p, temp_dir))
        return p

    def stop(self, timeout: float = 90) -> dict[str, int | None]:
        """Ask each service to end through its stop file, newest first (as body.sh's cleanup): exit codes."""
        codes: dict[str, int | None] = {}
        for name, p, _ in reversed(self.procs):
            (self.stop_dir / name).touch()
            try:
                codes[name] = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def kill(self) -> None:
        for _, p, _ in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)

    def log_tail(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(self.root.glob("*.log")))


def actor_nodes(gcs: str, env: dict) -> dict[str, str]:
    """Name -> Ray node id of the job's worker actors (alive or ended), from the GCS's actor table."""
    code = ("import json, sys, ray; from ray._private import state; ray.init(address=sys.argv[1], "
            "logging_level='error', log_to_driver=False); print(json.dumps({a['Name']: a['Address']['NodeID'] "
            "for a in state.actors().values() if a['Name'].startswith('kscale-')}))")
    r = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} ended ({proc.returncode})"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} does not listen on {port}"
            time.sleep(0.3)


def test_two_ray_nodes_started_as_the_sbatch_body_does_run_the_extraction(tmp_path):
    reference = extract_spec(tmp_path / "ref", data=DATA, extract=EXTRACT, resources={"executor": "local"})
    reference["model"] = MODEL
    ref = spec_from_dict(reference)
    run_job(ref, show_bar=False)

    d = extract_spec(tmp_path / "run", data=DATA, extract=EXTRACT, resources=RESOURCES)
    d["model"] = MODEL
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(d))
    store = Path(d["output"]["path"])

    env = clean_env(tmp_path / "home", tmp_path / "kscale-home")
    # as body.sh: a fresh per-job token in the environment, no drain on SIGTERM; loopback only (see
    # kscale.runner._loopback_only)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(32).hex(), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    head_base, worker_base = free_port_block(10), free_port_block(10)
    gcs = f"127.0.0.1:{head_base}"
    parent = Path(tempfile.mkdtemp(prefix="ksn-", dir="/tmp"))
    temps = [parent / f"node{i}" for i in range(2)]  # not yet created:
    services = Services(tmp_path, env)  # the wrapper creates each 0700
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    node = ["--block", "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats"]
    try:
        head = services.start("ray-head", temps[0], [
            *ray, "--head", "--node-ip-address=127.0.0.1", f"--port={head_base}", "--include-dashboard=false",
            f"--ray-client-server-port={head_base + 2}", *ray_ports(head_base), *node, f"--temp-dir={temps[0]}"])
        wait_port(head_base, head, "the Ray head")
        services.start("ray-worker", temps[1], [
            *JOIN, f"--address={gcs}", "--node-ip-address=127.0.0.1", *ray_ports(worker_base), *node,
            f"--temp-dir={temps[1]}"])
        waited = subprocess.run([sys.executable, "-m", "kscale.targets.slurm", "wait-ray", "--address", gcs,
                                 "--nodes", "2", "--timeout", "120"], env=env, capture_output=True, text=True,
                                timeout=180)
        assert waited.returncode == 0, waited.stderr + services.log_tail()
        assert "2 Ray node(s) up: 2 CPU, 2 GPU" in waited.stdout, waited.stdout

        rec = tmp_path / "records"
        driver = subprocess.run([sys.executable, "-m", "kscale.targets.records", "driver", "--id", "kscale-t-1",
                                 "--target", "slurm", "--record-dir", str(rec), str(spec_file)],
                                env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=600)
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-2000:]
        assert json.loads((rec / "kscale-t-1.state.json").read_text())["state"] == "SUCCEEDED"
        progress = json.loads((store / "_progress.json").read_text())
        placed = actor_nodes(gcs, env)  # the job's two workers: one on each node (each node holds one)
        assert len(placed) == 2 and len(set(placed.values())) == 2, placed
        # Which node commits how many shards depends on when each worker's model is loaded (a worker takes
        # shards once it is placed and set up): under load the head's may do all of them. Every shard was
        # committed by one of the job's workers on one of the two nodes.
        assert set(progress["nodes"]) <= set(placed.values()), (progress["nodes"], placed)
        assert sum(n["shards_done"] for n in progress["nodes"].values()) == 6, progress["nodes"]
        stores_equal(ref.output.path, str(store))
    finally:
        codes = services.stop()
        services.kill()  # whatever did not stop (the assertions below say so)
        left = [t.exists() for t in temps]
        shutil.rmtree(parent, ignore_errors=True)
    assert codes == {"ray-worker": 0, "ray-head": 0}, codes
    assert not any(left), "each wrapper removes its node's temp dir"
    host = socket.gethostname().split(".")[0]
    assert (services.logs / host / "ray-head.out").is_file() and (services.logs / host / "ray-worker.out").is_file()
    assert list((services.logs / host).glob("raylet*.out")), "the nodes' Ray logs are kept"
