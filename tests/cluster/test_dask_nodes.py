"""Dask across nodes: the analysis on a ``distributed`` cluster of three worker "nodes" joined as on Slurm.

The cluster is started here as ``kscale/templates/slurm/body.sh`` starts it in an allocation: one
``dask scheduler`` speaking TLS with a per-run certificate (:func:`kscale.targets.slurm.write_dask_tls`)
that writes a scheduler file, and one ``dask worker`` per node (a nanny and its worker, one thread,
own local directory, own process group), each joined through that scheduler file, loopback only. The
driver joins it like the Slurm driver does (``analyze.dask.scheduler_file`` and the TLS settings of the
sbatch body's ``DASK_DISTRIBUTED__COMM__*`` variables). Every process is started here and stopped by its
process group id.

- the table equals the one-process (threaded) run, row by row to 1e-9;
- a node killed (SIGKILL of its process group) while it executes a task of a layer under way is survived: the
  scheduler recomputes what it held on the other nodes and the table still equals the threaded run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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
    counts the layer's streaming tasks (``fused_map``: the MMD and direction sums of a block; ``chunk_sums``
    where a pass has the MMD's alone) each node finished. With ``stop_flag``: once one
    such task finished anywhere (``<stop_flag>.first-done``), the first node to start executing another
    claims the flag file (O_EXCL: exactly one node wins), writes its worker PID and process group there,
    and stops itself (SIGSTOP) before running it: that node then holds a task of a layer already under way,
    which cannot finish until the test kills the node. (At most 3 of the layer's >= 4 tasks run at once
    on 3 one-thread nodes, so some task starts after the first one finished.)"""

    name = "kscale-layer-tasks"

    def __init__(self, stop_flag: str | None = None):
        self.stop_flag = stop_flag
        self.finished = 0

    def transition(self, key, start, finish, **kwargs) -> None:
        from dask.utils import key_split

        if key_split(key) not in ("fused_map", "chunk_sums"):
            return
        if finish == "memory":
            self.finished += 1
            if self.stop_flag:
                Path(self.stop_flag + ".first-done").touch()
        elif finish == "executing" and self.stop_flag and os.path.exists(self.stop_flag + ".first-done"):
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A real store (8 shards, chunks that cut samples) and its one-process (threaded) table."""
    from kscale.spec.analyze import DaskConfig

    root = tmp_path_factory.mktemp("dask-nodes-store")
    ks = write_store(root / "store", chunk_tokens=4, n_shards=8, per_shard=3)
    return ks, _analyze(ks, root / "threads", DaskConfig(scheduler="threads", n_workers=N_NODES, chunk_mb=1))


def _on_nodes(tmp_path, cluster: DaskNodes, ks):
    """The table on the nodes, the driver joined as on Slurm (scheduler file, TLS from the dask config)."""
    import dask

    from kscale.spec.analyze import DaskConfig

    t0 = time.monotonic()
    with dask.config.set(cluster.client_config()):
        table = _analyze(ks, tmp_path / "nodes", DaskConfig(scheduler="distributed", n_workers=N_NODES,
                                                            chunk_mb=1, scheduler_file=str(cluster.scheduler_file)))
    print(f"analysis on the nodes: {time.monotonic() - t0:.1f} s")
    return table


def test_analysis_on_three_nodes_equals_threaded(tmp_path, dask_nodes, reference):
    with _client(dask_nodes) as client:
        workers = client.scheduler_info()["workers"]
        assert all(addr.startswith("tls://127.0.0.1:") for addr in workers)  # TLS, loopback
        own_dirs = sorted(Path(w["local_directory"]).relative_to(dask_nodes.root).parts[0] for w in workers.values())
        assert own_dirs == [f"node{i}" for i in range(N_NODES)]  # each node its own local directory
        client.register_plugin(LayerTasks())
        ks, threads = reference
        nodes = _on_nodes(tmp_path, dask_nodes, ks)
        finished = _finished_per_node(client)
    assert_same_table(nodes, threads)
    assert len(finished) == N_NODES and all(n > 0 for n in finished.values()), finished  # every node streamed


def _is_stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


def _kill_when_stopped(flag: Path, client, seen: dict, run_over: threading.Event, timeout: float = 120) -> None:
    """Watch for the node that stopped itself in a task of the layer; SIGKILL its process group (nanny and
    worker, as when a node dies) and note what the scheduler had running where at that moment."""
    deadline = time.monotonic() + timeout
    while not run_over.is_set() and time.monotonic() < deadline:
        victim = json.loads(flag.read_text()) if flag.exists() and flag.stat().st_size else None
        if victim and _is_stopped(victim["pid"]):
            seen.update(victim, processing={w: list(map(str, ks)) for w, ks in client.processing().items()})
            os.killpg(victim["pgid"], signal.SIGKILL)
            return
        time.sleep(0.05)


def test_node_killed_mid_layer_is_survived(tmp_path, dask_nodes, reference):
    flag = dask_nodes.root / "victim.json"
    seen: dict = {}
    run_over = threading.Event()
    with _client(dask_nodes) as client:
        client.register_plugin(LayerTasks(stop_flag=str(flag)))
        watcher = threading.Thread(target=_kill_when_stopped, args=(flag, client, seen, run_over), daemon=True)
        watcher.start()
        ks, threads = reference
        try:
            nodes = _on_nodes(tmp_path, dask_nodes, ks)
        finally:
            run_over.set()
            watcher.join()
        survivors = client.scheduler_info()["workers"]
        finished = _finished_per_node(client)
    print(f"killed node: {seen}")
    assert seen, "no node was killed"
    # the killed node was executing a task of the layer: at the kill the scheduler had it processing there
    assert any(key == seen["key"] for keys in seen["processing"].values() for key in keys), seen
    assert len(survivors) == N_NODES - 1 and all(n > 0 for n in finished.values()), (survivors, finished)
    victim_proc = next(p for p in dask_nodes.nodes if p.pid == seen["pgid"])
    assert victim_proc.wait(timeout=20) == -signal.SIGKILL
    assert_same_table(nodes, threads)  # its tasks recomputed on the survivors, each block merged once
