"""Dask across nodes: the analysis on a ``distributed`` cluster of three worker "nodes" joined as on Slurm.

The cluster is started here as ``kscale/templates/slurm/body.sh`` starts it in an allocation: one
``dask scheduler`` speaking TLS with a per-run certificate (:func:`kscale.targets.slurm.write_dask_tls`)
that writes a scheduler file, and one ``dask worker`` per node (a nanny and its worker, one thread,
own local directory, own process group), each joined through that scheduler file, loopback only. The
driver joins it like the Slurm driver does (``analyze.dask.scheduler_file`` and the TLS settings of the
sbatch body's ``DASK_DISTRIBUTED__COMM__*`` variables). Every process is started here and stopped by its
process group id.

- the table equals the one-process (threaded) run, row by row to 1e-9;
- a node killed (SIGKILL of its process group) while it executes a task of the layer is survived: the
  scheduler recomputes what it held on the other nodes and the table still equals the threaded run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from tests.cluster.helpers import REPO

sys.path.insert(0, str(REPO / "tests" / "unit" / "analysis"))
from test_analysis_outofcore import assert_same_table, small_analysis_cfg  # noqa: E402 (the unit test's own)
from test_analysis_streaming import write_store  # noqa: E402

N_NODES = 3
START_TIMEOUT_S = 60


@dataclass
class DaskNodes:
    scheduler_file: Path
    tls: Path
    root: Path
    scheduler: subprocess.Popen
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def client_config(self) -> dict:
        """The driver's TLS settings: what body.sh exports as DASK_DISTRIBUTED__COMM__* variables."""
        cert, key = str(self.tls / "cert.pem"), str(self.tls / "key.pem")
        return {"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": cert,
                "distributed.comm.tls.client.cert": cert, "distributed.comm.tls.client.key": key}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process group we started (its leader's PID is the group id), then reap the leaders."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


@pytest.fixture
def dask_nodes(tmp_path_factory):
    from kscale.targets.slurm import write_dask_tls

    root = tmp_path_factory.mktemp("dask-nodes")
    tls = root / "tls"
    write_dask_tls(tls)
    tls_args = ["--tls-ca-file", str(tls / "cert.pem"), "--tls-cert", str(tls / "cert.pem"),
                "--tls-key", str(tls / "key.pem")]
    sched_file = root / "scheduler.json"
    env = _node_env()

    def start(name: str, args: list[str]) -> subprocess.Popen:
        with open(root / f"{name}.log", "w") as log:
            return subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    cluster = DaskNodes(sched_file, tls, root, start("scheduler", [
        "distributed.cli.dask_scheduler", "--protocol", "tls", *tls_args, "--host", "127.0.0.1", "--port", "0",
        "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)]))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not sched_file.exists():
            assert cluster.scheduler.poll() is None, f"dask scheduler exited:\n{cluster.logs()}"
            assert time.monotonic() < deadline, f"no scheduler file:\n{cluster.logs()}"
            time.sleep(0.2)
        for i in range(N_NODES):
            local = root / f"node{i}"
            local.mkdir()
            cluster.nodes.append(start(f"node{i}", [
                "distributed.cli.dask_worker", *tls_args, "--scheduler-file", str(sched_file),
                "--nworkers", "1", "--nthreads", "1", "--memory-limit", "0", "--local-directory", str(local),
                "--host", "127.0.0.1", "--no-dashboard", "--name", f"node{i}"]))
        yield cluster
    finally:
        _stop([*cluster.nodes, cluster.scheduler])


class LayerTasks(WorkerPlugin):
    """A worker plugin (pickled by reference: the workers import this module from the repository) that
    counts the layer's streaming tasks (``chunk_sums``) each node finished. With ``stop_flag`` the first
    node in the cluster to start executing one claims the flag file (O_EXCL: exactly one node wins), writes
    its worker PID and process group there, and stops itself (SIGSTOP) before running the task: that node
    then holds a task of the layer that cannot finish, until the test kills it."""

    name = "kscale-layer-tasks"

    def __init__(self, stop_flag: str | None = None):
        self.stop_flag = stop_flag
        self.finished = 0

    def setup(self, worker) -> None:
        pass

    def teardown(self, worker) -> None:
        pass

    def transition(self, key, start, finish, **kwargs) -> None:
        from dask.utils import key_split

        if key_split(key) != "chunk_sums":
            return
        if finish == "memory":
            self.finished += 1
        elif finish == "executing" and self.stop_flag:
            try:
                fd = os.open(self.stop_flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                return
            os.write(fd, json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "key": str(key)}).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGSTOP)


def _finished_per_node(client) -> dict[str, int]:
    return client.run(lambda dask_worker: dask_worker.plugins[LayerTasks.name].finished)


def _client(cluster: DaskNodes):
    """A client of the nodes' scheduler (TLS from the config, as the Slurm driver's), once all nodes joined."""
    import dask
    from distributed import Client

    with dask.config.set(cluster.client_config()):
        client = Client(scheduler_file=str(cluster.scheduler_file), timeout=START_TIMEOUT_S)
    try:
        client.wait_for_workers(N_NODES, timeout=START_TIMEOUT_S)
    except BaseException:
        client.close()
        raise
    return client


def _analyze(ks, out: Path, dask_cfg):
    from kscale.analysis.run import analyze

    return analyze(small_analysis_cfg(dask_cfg), out, stores=[ks])


def _store(tmp_path):
    return write_store(tmp_path / "store", chunk_tokens=4, n_shards=8, per_shard=3)


def _threaded_and_nodes(tmp_path, cluster: DaskNodes):
    """The threaded table, and the table on the nodes (driver configured as on Slurm)."""
    import dask

    from kscale.spec.analyze import DaskConfig

    ks = _store(tmp_path)
    t0 = time.monotonic()
    threads = _analyze(ks, tmp_path / "threads", DaskConfig(scheduler="threads", n_workers=N_NODES, chunk_mb=1))
    t1 = time.monotonic()
    with dask.config.set(cluster.client_config()):
        nodes = _analyze(ks, tmp_path / "nodes", DaskConfig(scheduler="distributed", n_workers=N_NODES,
                                                            chunk_mb=1, scheduler_file=str(cluster.scheduler_file)))
    print(f"analysis: threaded {t1 - t0:.1f} s, on the nodes {time.monotonic() - t1:.1f} s")
    return threads, nodes


def test_analysis_on_three_nodes_equals_threaded(tmp_path, dask_nodes):
    with _client(dask_nodes) as client:
        workers = client.scheduler_info()["workers"]
        assert all(addr.startswith("tls://127.0.0.1:") for addr in workers)  # TLS, loopback
        own_dirs = sorted(Path(w["local_directory"]).relative_to(dask_nodes.root).parts[0] for w in workers.values())
        assert own_dirs == [f"node{i}" for i in range(N_NODES)]  # each node its own local directory
        client.register_plugin(LayerTasks())
        threads, nodes = _threaded_and_nodes(tmp_path, dask_nodes)
        finished = _finished_per_node(client)
    assert_same_table(nodes, threads)
    assert len(finished) == N_NODES and all(n > 0 for n in finished.values()), finished  # every node streamed


def _wait_stopped(pid: int, timeout: float = 30) -> None:
    """Until ``pid`` is in state T (stopped): the node stops itself right after claiming the flag."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        assert time.monotonic() < deadline, f"worker {pid} did not stop"
        time.sleep(0.05)


def test_node_killed_mid_layer_is_survived(tmp_path, dask_nodes, monkeypatch):
    from kscale.analysis.stream import Runner

    flag = dask_nodes.root / "victim.json"
    seen: dict = {}
    map_reduce = Runner.map_reduce

    def map_reduce_killing(self, fn, items, shared, merge):
        """The runner's map-reduce; at the first merge of the run (two results of the layer arrived on the
        driver) the node that stopped itself in a task of this same map-reduce is killed (SIGKILL, its whole
        process group: nanny and worker, as when a node dies)."""
        def merge_after_kill(a, b):
            if not seen and self.client is not None:  # on the nodes, not in the threaded reference run
                victim = json.loads(flag.read_text())  # claimed before any task ran: it exists now
                _wait_stopped(victim["pid"])
                seen.update(victim, n_items=len(items),
                            processing={w: list(map(str, ks)) for w, ks in client.processing().items()})
                os.killpg(victim["pgid"], signal.SIGKILL)
            return merge(a, b)

        if not seen and self.client is not None:
            assert len(items) >= N_NODES  # two results can arrive while the stopped node holds the third
        return map_reduce(self, fn, items, shared, merge_after_kill)

    monkeypatch.setattr(Runner, "map_reduce", map_reduce_killing)
    with _client(dask_nodes) as client:
        client.register_plugin(LayerTasks(stop_flag=str(flag)))
        threads, nodes = _threaded_and_nodes(tmp_path, dask_nodes)
        survivors = client.scheduler_info()["workers"]
        finished = _finished_per_node(client)
    assert seen, "no node was killed"
    # the killed node was executing a task of the layer: at the kill the scheduler had it processing there
    assert any(key == seen["key"] for keys in seen["processing"].values() for key in keys), seen
    assert len(survivors) == N_NODES - 1 and all(n > 0 for n in finished.values()), (survivors, finished)
    victim_proc = next(p for p in dask_nodes.nodes if p.pid == seen["pgid"])
    assert victim_proc.wait(timeout=20) == -signal.SIGKILL
    assert_same_table(nodes, threads)  # its task recomputed elsewhere, merged once
