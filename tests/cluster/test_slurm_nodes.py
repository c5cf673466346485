"""``cluster.slurm.nodes: 2`` through a real ``sbatch --nodes=2``: two Slurm nodes on this host (``kscale-n1``,
``kscale-n2``, each its own ``slurmd -N`` on its own port: the ``slurm_two_nodes`` fixture), the sbatch body
rendered by ``kscale submit --target slurm`` as for any cluster, nothing of it replaced.

The body starts the Ray head on the first node and a Ray worker node on the second (``srun --exclude=HEAD``),
waits for both, runs the driver on the head, then stops every service through its stop file. Two nodes on one
host is where a body that is only right on separate hosts breaks: the same Ray ports on both nodes (the second
cannot bind them and never joins), or one temp dir for both (the first node to stop removes the other's Ray
session and kills its processes, which name that dir). Each node has 1 CPU and each worker asks for 1, so
Ray can place the job's two workers only one per node.

Proves: the job succeeds with both Ray nodes up (``wait-ray`` sees 2), one worker actor on each Slurm node
(each node's kept Ray logs hold the ``:actor_name:`` line Ray prints when it creates an actor), every shard
committed by a worker on one of the two nodes, the store equal byte for byte to an in-process run, each
node's Ray logs kept in its own folder, both node temp dirs removed and none of the job's processes left.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.cluster.helpers import clean_env, kscale, own_pids, read_json
from tests.cluster.test_slurm import _assert_clean_log
from tests.conftest import extract_spec
from tests.integration.test_extract import stores_equal

pytestmark = pytest.mark.slow  # a two-node Slurm, two Ray nodes and an extraction across them: ~1-2 min

DATA = {"source": "generated", "generated": {"n_samples": 12, "image_size": 56}, "shard_size": 2}  # 6 shards
MODEL = {"path": "debug:qwen2_5_vl", "dtype": "float32", "device": "cpu"}
EXTRACT = {"batch_size": 1, "key_dtype": "float16"}
RESOURCES = {"executor": "ray", "workers": 2, "cpus_per_worker": 1}  # one per node: each node has 1 CPU
NODES = ("kscale-n1", "kscale-n2")


def actor_logs(node_logs: Path) -> list[Path]:
    """The worker logs of one node that record the creation of one of the job's shard actors."""
    return [f for f in node_logs.glob("worker-*.out") if ":actor_name:ShardActor" in f.read_text(errors="replace")]


def raylet_node_id(node_logs: Path) -> str:
    """The Ray node id a node's kept raylet log announces ("Setting node ID node_id=...")."""
    m = re.search(r"Setting node ID node_id=([0-9a-f]+)", (node_logs / "raylet.out").read_text(errors="replace"))
    assert m, f"no node id in {node_logs / 'raylet.out'}"
    return m.group(1)


def test_two_slurm_nodes_run_the_extraction_one_worker_per_node(slurm_two_nodes, tmp_path):
    cluster = {"slurm": {"nodes": 2, "cpus_per_node": 1, "time": "00:15:00"}}  # in the store's spec attributes
    ref = spec_from_dict({**extract_spec(tmp_path / "ref", data=DATA, extract=EXTRACT), "model": MODEL,
                          "cluster": cluster})
    run_job(ref, show_bar=False)

    d = extract_spec(tmp_path / "run", data=DATA, extract=EXTRACT, resources=RESOURCES)
    d.update(model=MODEL, cluster=cluster)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    env = clean_env(tmp_path / "home", tmp_path / "kscale-home")
    env["SLURM_CONF"] = slurm_two_nodes["SLURM_CONF"]
    t0 = time.monotonic()
    sub = kscale(["submit", str(job), "--target", "slurm"], env, tmp_path)
    m = re.search(r"submitted (kscale-[a-z0-9-]+) as Slurm job (\d+)", sub.stdout)
    assert sub.returncode == 0 and m, sub.stdout + sub.stderr
    sid, job_id = m.groups()
    logs = kscale(["logs", "-f", sid], env, tmp_path, timeout=600)
    elapsed = time.monotonic() - t0
    rec = Path(d["output"]["path"] + ".cluster")
    assert logs.returncode == 0 and "kscale driver: SUCCEEDED" in logs.stdout, \
        logs.stdout[-4000:] + logs.stderr + _service_output(rec / "ray-logs" / sid)
    assert "kscale: 2 Ray node(s) up: 2 CPU, 0 GPU" in logs.stdout, logs.stdout[-3000:]
    _assert_clean_log(logs.stdout)
    st = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in st and "NodeList=kscale-n[1-2]" in st, st

    # Each Slurm node kept its own Ray logs (raylet and the service's output) and ran one of the two workers.
    kept = rec / "ray-logs" / sid
    assert sorted(p.name for p in kept.iterdir()) == list(NODES), list(kept.iterdir())
    assert (kept / NODES[0] / "ray-head.out").is_file() and (kept / NODES[1] / "ray-worker.out").is_file()
    assert (kept / NODES[0] / "gcs_server.out").is_file(), "the head's Ray logs are kept whole"
    assert all((kept / n / "raylet.out").is_file() for n in NODES), "each node's Ray logs are kept"
    placed = {n: actor_logs(kept / n) for n in NODES}
    assert all(len(v) == 1 for v in placed.values()), placed
    ray_nodes = {n: raylet_node_id(kept / n) for n in NODES}
    assert len(set(ray_nodes.values())) == 2, ray_nodes

    # Which node commits how many shards depends on when each worker's model is loaded (a worker takes shards
    # once it is set up): under load the head's may do all of them. Every shard was committed on one of the two.
    store = Path(d["output"]["path"])
    progress = read_json(store / "_progress.json")
    assert set(progress["nodes"]) <= set(ray_nodes.values()), (progress["nodes"], ray_nodes)
    assert sum(n["shards_done"] for n in progress["nodes"].values()) == 6, progress["nodes"]
    assert progress["replaced_actors"] == 0, progress
    stores_equal(ref.output.path, str(store))

    # Every process of the job stopped, both node temp dirs removed (each node's own: ...-n0, ...-n1).
    prefix = f"/tmp/kscale-kscaleci-{job_id}-"
    deadline = time.monotonic() + 30
    while own_pids(prefix) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not own_pids(prefix) and not list(Path("/tmp").glob(f"kscale-kscaleci-{job_id}-*"))
    print(f"\nMEASURED slurm -N2: submit->driver done (logs -f returned) {elapsed:.1f} s")


def _service_output(kept: Path) -> str:
    """The services' own output (ray start's, per node), for a failure message."""
    if not kept.is_dir():
        return ""
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-2000:]}" for f in sorted(kept.glob("*/*.out"))
                     if f.name.startswith(("ray-", "dask-")))

