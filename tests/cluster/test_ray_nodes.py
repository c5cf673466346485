"""Extraction across several Ray nodes on this machine: workers spread over nodes, a node lost mid-run.

A Ray head (no CPUs or GPUs: only the driver, i.e. this test process, runs there) and worker nodes that each
declare 1 CPU and 2 GPUs they do not have (``ray.cluster_utils.Cluster``: every node is its own raylet
with its own node id, started by this process, stopped by the PIDs it holds). Loopback only, own HOME
(Ray's auth token) and own temp dir. The GCS health check is shortened so a killed raylet is declared dead
in ~3 s. The real extraction stage runs on the nodes (``model.device: cpu`` with a GPU resource per worker:
Ray hands each actor a GPU id and the model stays on the CPU), and every store is compared byte for byte
with an in-process run of the same job (:func:`tests.integration.test_extract.stores_equal`).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec
from tests.integration.test_extract import stores_equal

pytestmark = pytest.mark.slow  # 40-100 s each (three Ray nodes started per test): `make test-cluster`, `make test-slow`

DATA = {"source": "generated", "generated": {"n_samples": 12, "image_size": 56}, "shard_size": 2}  # 6 shards
EXTRACT = {"batch_size": 1, "key_dtype": "float16"}
MODEL = {"path": "debug:qwen2_5_vl", "dtype": "float32", "device": "cpu"}
WORKERS = {"executor": "ray", "workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 0.5}


class Nodes:
    """The test's Ray cluster: ``add()`` a worker node, ``raylet_pid(node_id)``, ``kill(node_id)``."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.workers: dict[str, object] = {}  # node id -> ray._private.node.Node

    def add(self, num_cpus: float = 1, num_gpus: int = 2) -> str:
        node = self.cluster.add_node(num_cpus=num_cpus, num_gpus=num_gpus, node_ip_address="127.0.0.1",
                                     include_dashboard=False)
        self.workers[node.node_id] = node
        return node.node_id

    def raylet_pid(self, node_id: str) -> int:
        from ray._private import ray_constants

        return self.workers[node_id].all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    def remove_all(self) -> None:
        for node in list(self.cluster.worker_nodes):
            self.cluster.remove_node(node, allow_graceful=False)  # kills the PIDs this process started
        self.workers.clear()


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node of our own with the driver (this process) connected to it; worker nodes come per test."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # another module's local Ray: this module's driver joins its own cluster
    saved = dict(os.environ)
    home = tempfile.mkdtemp(prefix="kn-home-")
    temp_dir = tempfile.mkdtemp(prefix="kn-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    for k in [k for k in os.environ if k.startswith("RAY_") and k != "RAY_USAGE_STATS_ENABLED"]:
        del os.environ[k]
    # Loopback only: without this, Ray turns 127.0.0.1 into the routable address on Linux (see
    # kscale.runner._loopback_only); read by every Ray process this test starts, and by this driver.
    os.environ.update(HOME=home, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    old_const, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, num_gpus=0, node_ip_address="127.0.0.1", temp_dir=temp_dir, include_dashboard=False,
        _system_config={"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                        "health_check_failure_threshold": 3}))
    nodes = Nodes(cluster)
    try:
        ray.init(address=cluster.address, logging_level="warning")
        yield nodes
    finally:
        ray.shutdown()
        nodes.remove_all()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def nodes(ray_cluster):
    """Worker nodes of one test, removed (their processes killed by PID) when it ends."""
    yield ray_cluster
    ray_cluster.remove_all()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The same job in this process (no Ray): the store every multi-node run must equal."""
    d = extract_spec(tmp_path_factory.mktemp("ref"), data=DATA, extract=EXTRACT)
    d["model"] = MODEL
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    return spec.output.path


def job(tmp_path: Path, **resources) -> dict:
    d = extract_spec(tmp_path, data=DATA, extract=EXTRACT, resources={**WORKERS, **resources})
    d["model"] = MODEL
    return d


def progress(store: str) -> dict:
    return json.loads((Path(store) / "_progress.json").read_text())


def test_workers_spread_over_nodes_and_the_store_equals_one_process(tmp_path, nodes, reference):
    """Two workers on two nodes: each node commits shards, the driver stays on the head, and the store equals
    the in-process run byte for byte. Each node could hold both workers (4 GPUs, 1 CPU; a worker takes 1 GPU
    and 0.25 CPU), where Ray's default policy packs them onto one node: only SPREAD puts them on two."""
    import ray

    from kscale.executors.ray import RayExecutor
    from kscale.extract.run import run_extract
    from tests.cluster.all_workers_stage import remove_files

    a, b = nodes.add(num_gpus=4), nodes.add(num_gpus=4)
    head = ray.get_runtime_context().get_node_id()
    assert head not in (a, b)
    spec = spec_from_dict(job(tmp_path, cpus_per_worker=0.25))
    # shards start once both workers are set up (a worker takes shards only once it is: one that loads its
    # model late could otherwise find every shard done)
    summary = run_extract(spec, RayExecutor("tests.cluster.all_workers_stage", show_bar=False))
    remove_files(spec.output.path)
    assert summary.state == "succeeded" and summary.shards_done == 6
    p = progress(spec.output.path)
    assert set(p["nodes"]) == {a, b}, p["nodes"]  # both nodes worked, nothing ran on the head
    assert all(n["shards_done"] >= 1 and not n["node_lost"] for n in p["nodes"].values()), p["nodes"]
    assert sum(n["shards_done"] for n in p["nodes"].values()) == 6
    assert sorted(p["shard_nodes"]) == [f"s{i:06d}" for i in range(6)] and set(p["shard_nodes"].values()) == {a, b}
    assert p["replaced_actors"] == 0
    stores_equal(reference, spec.output.path)


def test_a_node_killed_mid_run_is_replaced_and_the_store_is_identical(tmp_path, nodes, reference):
    """SIGKILL the raylet of the node that holds shard s000002 (its PID, from this test's cluster): the GCS
    declares the node dead, its worker is replaced on the surviving node, s000002 is redone there, and the
    store equals the in-process run byte for byte."""
    from tests.cluster.node_kill_stage import VICTIM
    from kscale.executors.ray import RayExecutor
    from kscale.extract.run import run_extract

    a, b = nodes.add(), nodes.add()
    spec = spec_from_dict(job(tmp_path))
    note = Path(spec.output.path) / "kill-me.json"
    killed, finished = [], threading.Event()

    def killer():
        while not note.exists():
            if finished.wait(0.05):
                return
        victim = json.loads(note.read_text())
        os.kill(nodes.raylet_pid(victim["node"]), signal.SIGKILL)
        killed.append(victim)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        summary = run_extract(spec, RayExecutor("tests.cluster.node_kill_stage", show_bar=False))
    finally:
        finished.set()
        t.join(timeout=5)
    assert killed and killed[0]["shard"] == VICTIM
    lost = killed[0]["node"]
    survivor = ({a, b} - {lost}).pop()
    assert summary.shards_failed == 0 and summary.shards_done == 6, summary
    assert summary.retried[VICTIM][0].startswith("worker died"), summary.retried
    p = progress(spec.output.path)
    assert p["nodes"][lost]["node_lost"] and p["nodes"][lost]["actors_lost"] == 1, p["nodes"]
    assert p["replaced_actors"] == 1
    assert p["shard_nodes"][VICTIM] == survivor  # redone on the node that is left
    # On a real node loss the machine is gone with its raylet. Here the lost node's worker is a process on
    # this machine that Ray does not stop (it sleeps and never talks to its dead raylet): ours, by its PID.
    if _alive(killed[0]["pid"]):
        os.kill(killed[0]["pid"], signal.SIGKILL)
    stores_equal(reference, spec.output.path)


def test_a_node_lost_with_no_room_left_for_its_replacement_still_ends(tmp_path, nodes, reference):
    """Nodes of 1 GPU, one worker each: the node holding ``s000002`` is killed, and its replacement cannot be
    placed (the survivor is full). The replacement holds no shard while it waits; the survivor redoes
    ``s000002`` and the rest, and the run ends (before the fix the replacement was sent the requeued shard at
    once and the run never ended); the store equals one process."""
    from tests.cluster.node_kill_stage import VICTIM
    from kscale.executors.ray import RayExecutor
    from kscale.extract.run import run_extract

    a, b = nodes.add(num_gpus=1), nodes.add(num_gpus=1)
    spec = spec_from_dict(job(tmp_path))
    note = Path(spec.output.path) / "kill-me.json"
    killed, result = [], []
    t = threading.Thread(target=lambda: result.append(
        run_extract(spec, RayExecutor("tests.cluster.node_kill_stage", show_bar=False))), daemon=True)
    t.start()
    deadline = time.monotonic() + 180
    while not note.exists() and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert note.exists(), "no worker reached the victim shard"
    victim = json.loads(note.read_text())
    os.kill(nodes.raylet_pid(victim["node"]), signal.SIGKILL)
    killed.append(victim)
    t.join(timeout=240)
    if _alive(victim["pid"]):  # the lost node's worker (see the test above): ours, by its PID
        os.kill(victim["pid"], signal.SIGKILL)
    assert result, "the run did not end within 240 s of the node loss (a worker that cannot be placed holds a shard)"
    summary = result[0]
    survivor = ({a, b} - {victim["node"]}).pop()
    assert summary.shards_failed == 0 and summary.shards_done == 6, summary
    p = progress(spec.output.path)
    assert p["shard_nodes"][VICTIM] == survivor and p["replaced_actors"] == 1, p
    stores_equal(reference, spec.output.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_two_gpu_workers_each_hold_two_gpus_of_one_node(tmp_path, nodes, reference):
    """``gpus_per_worker: 2`` on nodes of 2 GPUs: each worker is given both GPUs of one node (Ray assigns an
    actor's whole request on one node), so two workers take the two nodes; the store equals the in-process
    run. The model itself runs whole on the CPU (tests/cluster/gpu_placement_stage.py says why)."""
    from kscale.executors.ray import RayExecutor
    from kscale.extract.run import run_extract

    a, b = nodes.add(), nodes.add()
    spec = spec_from_dict(job(tmp_path, gpus_per_worker=2))
    summary = run_extract(spec, RayExecutor("tests.cluster.gpu_placement_stage", show_bar=False))
    assert summary.shards_done == 6 and summary.shards_failed == 0
    seen = [json.loads(f.read_text()) for f in (Path(spec.output.path) / "placement").glob("*.json")]
    assert len(seen) == 2, seen
    assert {s["node"] for s in seen} == {a, b}, seen  # one worker per node: neither node could hold two
    assert all(sorted(s["gpus"]) == ["0", "1"] for s in seen), seen  # both GPUs of its node
    # which node commits how many shards depends on when each worker is set up (it then pulls shards)
    p = progress(spec.output.path)
    assert set(p["nodes"]) <= {a, b} and sum(n["shards_done"] for n in p["nodes"].values()) == 6, p["nodes"]
    for s in [p for p in (Path(spec.output.path) / "placement").iterdir()]:
        s.unlink()
    (Path(spec.output.path) / "placement").rmdir()
    stores_equal(reference, spec.output.path)


def test_a_node_that_joins_mid_run_takes_work(tmp_path, nodes, reference):
    """Two workers, room for one: the second waits (pending in Ray, holding no shard) until a node joins while
    the first is in its first shard; it is then set up on the new node and commits shards there; the store
    equals one process. The stage holds shards until both workers are set up (tests/cluster/all_workers_stage.py:
    a worker takes shards once it is set up, and a late one could find them all done). The job runs in a thread:
    the node is started from the main thread (``Cluster.add_node`` from another thread did not start a node in
    our first try)."""
    from kscale.executors.ray import RayExecutor
    from kscale.extract.run import run_extract
    from tests.cluster.all_workers_stage import remove_files

    a = nodes.add(num_gpus=1)
    spec = spec_from_dict(job(tmp_path))
    workers_dir = Path(spec.output.path) / "workers"
    result: list = []
    t = threading.Thread(target=lambda: result.append(
        run_extract(spec, RayExecutor("tests.cluster.all_workers_stage", show_bar=False))), daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while not list(workers_dir.glob("*.json")) and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert t.is_alive() and len(list(workers_dir.glob("*.json"))) == 1, "the first worker is not up alone"
    assert not list((Path(spec.output.path) / "shards").glob("*.done.json"))
    c = nodes.add(num_gpus=1)
    t.join(timeout=180)
    assert result, "the run did not finish within 180 s of the node joining"
    summary = result[0]
    assert summary.shards_done == 6 and summary.shards_failed == 0
    remove_files(spec.output.path)
    p = progress(spec.output.path)
    assert set(p["nodes"]) == {a, c} and p["nodes"][c]["shards_done"] >= 1, p["nodes"]
    stores_equal(reference, spec.output.path)


# ----------------------------------------------------------------------------- the bias stage across nodes

BIAS_DATA = {"source": "generated", "shard_size": 2,
             "generated": {"n_samples": 12, "image_size": 56, "tasks": ["color", "conflict"]}}  # 6 shards


def bias_job(tmp_path: Path, model_dir: str, **resources) -> dict:
    from tests.unit.bias.conftest import bias_job as small_bias_job

    return small_bias_job(tmp_path, model_dir, data=BIAS_DATA,
                          resources={**WORKERS, "torch_threads": 1, **resources})


@pytest.fixture(scope="module")
def bias_reference(tmp_path_factory, qwen_dir) -> Path:
    """The bias job in this process (no Ray): the tables every multi-node run must equal."""
    d = bias_job(tmp_path_factory.mktemp("bias-ref"), qwen_dir)
    d["resources"] = {"executor": "local", "torch_threads": 1}
    result = run_job(spec_from_dict(d), show_bar=False)
    assert result.state == "succeeded" and result.shards_done == 6
    return Path(result.run_dir)


def bias_tables_equal(reference: Path, run_dir: str) -> None:
    """The per-sample and the aggregate table equal the one-process run's, value for value."""
    import pandas as pd

    for name in ("samples.parquet", "aggregate.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(Path(run_dir) / name), pd.read_parquet(reference / name),
                                      check_exact=True)


def test_bias_workers_spread_over_nodes_and_the_table_equals_one_process(tmp_path, nodes, qwen_dir, bias_reference):
    """The bias stage's two workers on two nodes: both nodes score shards, nothing runs on the head, and the
    per-sample and aggregate tables equal the in-process run's exactly. Each node could hold both workers
    (4 GPUs): only SPREAD puts them on two; shards wait until both are set up (bias_all_workers_stage)."""
    import ray

    from kscale.bias.run import run_bias
    from kscale.executors.ray import RayExecutor
    from tests.cluster.all_workers_stage import remove_files

    a, b = nodes.add(num_gpus=4), nodes.add(num_gpus=4)
    head = ray.get_runtime_context().get_node_id()
    spec = spec_from_dict(bias_job(tmp_path, qwen_dir, cpus_per_worker=0.25))
    result = run_bias(spec, RayExecutor("tests.cluster.bias_all_workers_stage", show_bar=False))
    remove_files(spec.output.path)
    assert result.state == "succeeded" and result.shards_done == 6 and result.shards_failed == 0, result
    p = progress(spec.output.path)
    assert set(p["nodes"]) == {a, b} and head not in p["nodes"], p["nodes"]
    assert all(n["shards_done"] >= 1 for n in p["nodes"].values()), p["nodes"]
    assert set(p["shard_nodes"]) == {f"base.s{i:06d}" for i in range(6)}, p["shard_nodes"]
    bias_tables_equal(bias_reference, result.run_dir)


def test_a_node_killed_mid_bias_is_replaced_and_the_table_is_identical(tmp_path, nodes, qwen_dir, bias_reference):
    """SIGKILL the raylet of the node that scores ``base.s000002``: its worker is replaced on the surviving node,
    the shard is scored again there, and both tables equal the in-process run's exactly."""
    from kscale.bias.run import run_bias
    from kscale.executors.ray import RayExecutor

    a, b = nodes.add(), nodes.add()
    spec = spec_from_dict(bias_job(tmp_path, qwen_dir))
    note = Path(spec.output.path) / "kill-me.json"
    result: list = []
    t = threading.Thread(target=lambda: result.append(
        run_bias(spec, RayExecutor("tests.cluster.bias_node_kill_stage", show_bar=False))), daemon=True)
    t.start()
    deadline = time.monotonic() + 240
    while not note.exists() and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert note.exists(), "no worker reached the victim shard"
    victim = json.loads(note.read_text())
    os.kill(nodes.raylet_pid(victim["node"]), signal.SIGKILL)
    t.join(timeout=240)
    if _alive(victim["pid"]):  # the lost node's worker (see the extraction test): ours, by its PID
        os.kill(victim["pid"], signal.SIGKILL)
    assert result, "the bias run did not end within 240 s of the node loss"
    survivor = ({a, b} - {victim["node"]}).pop()
    assert victim["shard"] == "base.s000002"
    assert result[0].shards_done == 6 and result[0].shards_failed == 0, result[0]
    p = progress(spec.output.path)
    assert p["nodes"][victim["node"]]["node_lost"] and p["replaced_actors"] == 1, p["nodes"]
    assert p["shard_nodes"]["base.s000002"] == survivor, p["shard_nodes"]
    bias_tables_equal(bias_reference, result[0].run_dir)
