"""``cluster.slurm.nodes: 2`` through a real ``sbatch --nodes=2``: two Slurm nodes on this host (``kscale-n1``,
``kscale-n2``, each its own ``slurmd -N`` on its own port: the ``slurm_two_nodes`` fixture), the sbatch body
rendered by ``kscale submit --target slurm`` as for any cluster, nothing of it replaced. Two nodes on one
host is where a body that is only right on separate hosts breaks: the same ports on both nodes (the second
cannot bind them and never joins), or one temp dir for both (the first node to stop removes the other's
session and kills its processes, which name that dir).

**Extraction** (``test_two_slurm_nodes_run_the_extraction_one_worker_per_node``): the body starts the Ray head
on the first node and a Ray worker node on the second (``srun --exclude=HEAD``), waits for both, runs the driver
on the head, then stops every service through its stop file. Each node has 1 CPU and each worker asks for 1, so
Ray can place the job's two workers only one per node. The driver's shard pool runs
``tests.cluster.all_workers_stage`` (the real extraction worker, whose shards wait until both workers are set
up; selected in the driver only, by ``tests/cluster/slurm_driver_hook/sitecustomize.py``), so a worker whose
model loads late still finds shards left. Proves: the job succeeds with both Ray nodes up, one worker actor on
each Slurm node (each node's kept Ray logs hold the ``:actor_name:`` line Ray prints when it creates an actor),
**each node's Ray node id commits at least one shard** (``_progress.json`` ``shard_nodes``), the store equal
byte for byte to an in-process run, each node's Ray logs kept in its own folder, both node temp dirs removed
and none of the job's processes left.

**Analysis** (``test_two_slurm_nodes_run_the_analysis_one_dask_worker_per_node``): a ``kind: analyze`` job of
a small store made here; the body starts the dask scheduler (TLS, a ``write_dask_tls`` certificate) on the
first node writing its scheduler file into the record dir, one ``dask worker`` per node (its local directory
the node's ``-n{node}`` temp dir), waits for both and runs the driver, which joins through the scheduler file.
Each worker records the tasks it computed (``tests/cluster/dask_task_record.py``, a dask worker preload set
through the environment). Proves: the job succeeds, two dask workers registered with the scheduler, one on each
Slurm node (each node's kept ``dask-worker.out`` and the task records, whose addresses match), both computed
streaming tasks of the layer (``fused_map``/``chunk_sums``), the results table equals the in-process threaded analysis of the same store
row by row to 1e-9, the log is clean, the TLS files, both node temp dirs and every process of the job are gone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.cluster.helpers import REPO, clean_env, kscale, own_pids, read_json
from tests.cluster.test_slurm import _assert_clean_log
from tests.conftest import extract_spec
from tests.integration.test_extract import stores_equal

sys.path.insert(0, str(REPO / "tests" / "unit" / "analysis"))
from test_analysis_outofcore import assert_same_table  # noqa: E402 (the unit test's own)
from test_analysis_streaming import write_store  # noqa: E402

pytestmark = pytest.mark.slow  # a two-node Slurm, two Ray nodes (or a dask cluster) and a job across them: ~2-3 min

DATA = {"source": "generated", "generated": {"n_samples": 12, "image_size": 56}, "shard_size": 2}  # 6 shards
MODEL = {"path": "debug:qwen2_5_vl", "dtype": "float32", "device": "cpu"}
EXTRACT = {"batch_size": 1, "key_dtype": "float16"}
RESOURCES = {"executor": "ray", "workers": 2, "cpus_per_worker": 1}  # one per node: each node has 1 CPU
NODES = ("kscale-n1", "kscale-n2")
HOOK = REPO / "tests" / "cluster" / "slurm_driver_hook"  # sitecustomize: the driver's shard pool module


def job_env(tmp_path: Path, slurm: dict, **extra: str) -> dict:
    """The submitting environment (sbatch passes it to the job and its steps): our HOME and KSCALE_HOME, the
    private Slurm, the repository importable on the nodes (tests.cluster modules) and ``extra``."""
    env = clean_env(tmp_path / "home", tmp_path / "kscale-home")
    env["SLURM_CONF"] = slurm["SLURM_CONF"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def submit_and_follow(job: Path, env: dict, tmp_path: Path, rec: Path, runtime: str) -> tuple[str, str, str, float]:
    """``kscale submit --target slurm``, then ``kscale logs -f`` until the job ends: (sid, job id, log, seconds)."""
    t0 = time.monotonic()
    sub = kscale(["submit", str(job), "--target", "slurm"], env, tmp_path)
    m = re.search(r"submitted (kscale-[a-z0-9-]+) as Slurm job (\d+)", sub.stdout)
    assert sub.returncode == 0 and m, sub.stdout + sub.stderr
    sid, job_id = m.groups()
    logs = kscale(["logs", "-f", sid], env, tmp_path, timeout=600)
    elapsed = time.monotonic() - t0
    assert logs.returncode == 0 and "kscale driver: SUCCEEDED" in logs.stdout, \
        logs.stdout[-4000:] + logs.stderr + _service_output(rec / f"{runtime}-logs" / sid)
    _assert_clean_log(logs.stdout)
    st = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in st and "NodeList=kscale-n[1-2]" in st, st
    return sid, job_id, logs.stdout, elapsed


def assert_job_gone(job_id: str, *markers: str) -> None:
    """Every process of the job stopped (none names its node temp dirs or ``markers``), both node temp dirs
    (each node's own: ...-n0, ...-n1) removed."""
    prefixes = (f"/tmp/kscale-kscaleci-{job_id}-", *markers)
    deadline = time.monotonic() + 30
    while any(own_pids(p) for p in prefixes) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {p: own_pids(p) for p in prefixes}
    assert not any(left.values()), left
    assert not list(Path("/tmp").glob(f"kscale-kscaleci-{job_id}-*"))


def actor_logs(node_logs: Path) -> list[Path]:
    """The worker logs of one node that record the creation of one of the job's shard actors."""
    return [f for f in node_logs.glob("worker-*.out") if ":actor_name:ShardActor" in f.read_text(errors="replace")]


def raylet_node_id(node_logs: Path) -> str:
    """The Ray node id a node's kept raylet log announces ("Setting node ID node_id=...")."""
    m = re.search(r"Setting node ID node_id=([0-9a-f]+)", (node_logs / "raylet.out").read_text(errors="replace"))
    assert m, f"no node id in {node_logs / 'raylet.out'}"
    return m.group(1)


def test_two_slurm_nodes_run_the_extraction_one_worker_per_node(slurm_two_nodes, tmp_path):
    from tests.cluster.all_workers_stage import remove_files

    cluster = {"slurm": {"nodes": 2, "cpus_per_node": 1, "time": "00:15:00"}}  # in the store's spec attributes
    ref = spec_from_dict({**extract_spec(tmp_path / "ref", data=DATA, extract=EXTRACT), "model": MODEL,
                          "cluster": cluster})
    run_job(ref, show_bar=False)

    d = extract_spec(tmp_path / "run", data=DATA, extract=EXTRACT, resources=RESOURCES)
    d.update(model=MODEL, cluster=cluster)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    env = job_env(tmp_path, slurm_two_nodes, KSCALE_TEST_EXTRACT_WORKER="tests.cluster.all_workers_stage")
    env["PYTHONPATH"] = f"{HOOK}{os.pathsep}{env['PYTHONPATH']}"
    rec = Path(d["output"]["path"] + ".cluster")
    sid, job_id, log, elapsed = submit_and_follow(job, env, tmp_path, rec, "ray")
    assert "kscale: 2 Ray node(s) up: 2 CPU, 0 GPU" in log, log[-3000:]

    # Each Slurm node kept its own Ray logs (raylet and the service's output), under its own Ray node id.
    kept = rec / "ray-logs" / sid
    assert sorted(p.name for p in kept.iterdir()) == list(NODES), list(kept.iterdir())
    assert (kept / NODES[0] / "ray-head.out").is_file() and (kept / NODES[1] / "ray-worker.out").is_file()
    assert (kept / NODES[0] / "gcs_server.out").is_file(), "the head's Ray logs are kept whole"
    assert all((kept / n / "raylet.out").is_file() for n in NODES), "each node's Ray logs are kept"
    ray_nodes = {n: raylet_node_id(kept / n) for n in NODES}
    assert len(set(ray_nodes.values())) == 2, ray_nodes

    # Both nodes did extraction work: each Slurm node's Ray node committed shards (the driver's record), and
    # the two workers that waited for each other ran one on each node.
    store = Path(d["output"]["path"])
    progress = read_json(store / "_progress.json")
    per_node = Counter(progress["shard_nodes"].values())
    print(f"\nshards per Slurm node: { {n: per_node[r] for n, r in ray_nodes.items()} }")
    assert len(progress["shard_nodes"]) == 6 and set(per_node) <= set(ray_nodes.values()), (progress, ray_nodes)
    assert all(per_node[r] >= 1 for r in ray_nodes.values()), ({n: per_node[r] for n, r in ray_nodes.items()})
    assert {n: v["shards_done"] for n, v in progress["nodes"].items()} == dict(per_node), progress["nodes"]
    assert progress["replaced_actors"] == 0, progress
    held = sorted(json.loads(f.read_text())["node"] for f in (store / "workers").glob("*.json"))
    assert held == sorted(ray_nodes.values()), (held, ray_nodes)  # the held stage ran, one worker per node
    placed = {n: actor_logs(kept / n) for n in NODES}
    assert all(len(v) == 1 for v in placed.values()), placed
    remove_files(str(store))
    stores_equal(ref.output.path, str(store))

    assert_job_gone(job_id)
    print(f"MEASURED slurm -N2 extraction: submit->driver done (logs -f returned) {elapsed:.1f} s")


ANALYZE = {"layers": [0], "estimators": ["mmd_rf", "jsd_hist"],  # the distributed tests' small analysis
           "mmd": {"n_features": 64, "median_subsample": 100, "max_accumulator_mb": 1},
           "significance": {"n_buckets": 8, "permutations": 0}, "embed": {"methods": []}}
KEY_COLUMNS = ["store", "layer", "head", "comparison", "estimator", "kernel", "normalisation", "multiple",
               "n_tokens", "n_samples"]


def analyze_spec(store: Path, out: Path, **extra) -> dict:
    return {"kind": "analyze", "name": "two-node-analysis", "output": {"path": str(out)},
            "analyze": {**ANALYZE, "stores": [str(store)], "dask": {"n_workers": 2, "chunk_mb": 1}}, **extra}


def worker_address(out_file: Path) -> str:
    """The address a dask worker's kept output announces ("Start worker at: tls://...")."""
    m = re.search(r"Start worker at:\s+(\S+)", out_file.read_text(errors="replace"))
    assert m, f"no worker address in {out_file}:\n{out_file.read_text(errors='replace')[-2000:]}"
    return m.group(1)


def test_two_slurm_nodes_run_the_analysis_one_dask_worker_per_node(slurm_two_nodes, tmp_path):
    import pandas as pd

    store = tmp_path / "store"
    write_store(store, chunk_tokens=4, n_shards=8, per_shard=3)  # 8 shards, chunks that cut samples
    run_job(spec_from_dict(analyze_spec(store, tmp_path / "threads")), show_bar=False)  # in-process, threads

    out = tmp_path / "run"
    d = analyze_spec(store, out, cluster={"slurm": {"nodes": 2, "cpus_per_node": 1, "time": "00:15:00"},
                                          "ray": {"node_wait_s": 180}})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    preload = '["tests.cluster.dask_task_record"]'
    env = job_env(tmp_path, slurm_two_nodes, KSCALE_TEST_DASK_TASKS=str(tasks),
                  DASK_DISTRIBUTED__WORKER__PRELOAD=preload, DASK_DISTRIBUTED__SCHEDULER__PRELOAD=preload)
    rec = Path(str(out) + ".cluster")
    sid, job_id, log, elapsed = submit_and_follow(job, env, tmp_path, rec, "dask")
    assert "kscale: starting dask scheduler (TLS)" in log and "kscale: 2 dask worker(s) up" in log, log[-3000:]

    # One dask worker on each Slurm node: each node's kept output, joined to the TLS scheduler.
    kept = rec / "dask-logs" / sid
    assert sorted(p.name for p in kept.iterdir()) == list(NODES), list(kept.iterdir())
    assert (kept / NODES[0] / "dask-scheduler.out").is_file() and not (kept / NODES[1] / "dask-scheduler.out").exists()
    addresses = {n: worker_address(kept / n / "dask-worker.out") for n in NODES}
    assert len(set(addresses.values())) == 2 and all(a.startswith("tls://") for a in addresses.values()), addresses
    sched_log = (kept / NODES[0] / "dask-scheduler.out").read_text(errors="replace")
    assert all(f"Register worker addr: {a}" in sched_log for a in addresses.values()), sched_log[-3000:]

    # Both workers computed tasks of the layer's streaming pass (the workers' own records of what they ran).
    records = [json.loads(f.read_text()) for f in sorted(tasks.glob("*.json")) if f.name != "scheduler.json"]
    by_node = {r["node"]: r for r in records}
    assert len(records) == 2 and sorted(by_node) == list(NODES), records
    assert {n: r["address"] for n, r in by_node.items()} == addresses, (by_node, addresses)
    # the layer's streaming tasks: ``fused_map`` (the MMD and direction sums of a block in one task), or
    # ``chunk_sums`` in a pass that has the MMD's alone
    chunk_sums = {n: sum(len(r["tasks"].get(k, [])) for k in ("fused_map", "chunk_sums")) for n, r in by_node.items()}
    print(f"\nstreaming tasks per Slurm node: {chunk_sums}; tasks: "
          f"{ {n: {k: len(v) for k, v in r['tasks'].items()} for n, r in by_node.items()} }")
    assert all(c >= 1 for c in chunk_sums.values()), chunk_sums

    # Every dask server's scratch space in the job's own temp dir of its node (the scheduler's beside the head
    # node's worker's), none in the node's shared /tmp/dask-scratch-space.
    node_tmp = f"/tmp/kscale-kscaleci-{job_id}-"
    sched = json.loads((tasks / "scheduler.json").read_text())
    assert sched["node"] == NODES[0], sched
    assert re.fullmatch(re.escape(node_tmp) + r"[0-9a-f]{8}-n0-s/dask-scratch-space/scheduler-\w+",
                        sched["local_directory"]), sched
    for i, n in enumerate(NODES):
        assert re.fullmatch(re.escape(node_tmp) + rf"[0-9a-f]{{8}}-n{i}/dask-scratch-space/worker-\w+",
                            by_node[n]["local_directory"]), by_node[n]
    # Every dask dashboard (plain HTTP, no TLS, no login) bound to the node's loopback only: reached through the
    # ssh tunnel the log prints, never by other users of the node or the cluster's network.
    dashboards = [sched["dashboard"], *(r["dashboard"] for r in records)]
    assert all(d and d.startswith("127.0.0.1:") for d in dashboards), dashboards

    # The table equals the in-process threaded run, row by row to 1e-9.
    got = pd.read_parquet(out / "results.parquet")
    want = pd.read_parquet(tmp_path / "threads" / "results.parquet")
    assert got[KEY_COLUMNS].astype(str).values.tolist() == want[KEY_COLUMNS].astype(str).values.tolist()
    assert_same_table(got, want)

    # The per-job secrets and every process (scheduler and workers name the record dir) gone.
    assert not (rec / f"{sid}.dask-tls").exists() and not (rec / f"{sid}.ray-token").exists()
    assert_job_gone(job_id, f"{rec}/{sid}.")
    print(f"MEASURED slurm -N2 analysis: submit->driver done (logs -f returned) {elapsed:.1f} s")


def _service_output(kept: Path) -> str:
    """The services' own output (ray start's, dask's, per node), for a failure message."""
    if not kept.is_dir():
        return ""
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-2000:]}" for f in sorted(kept.glob("*/*.out"))
                     if f.name.startswith(("ray-", "dask-")))
