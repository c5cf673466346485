"""The Ray executor's dashboard metrics carry the Ray node id and host of the worker that counted them: read
back from the node's Prometheus endpoint (``/metrics`` on Ray's metrics export port, what Prometheus scrapes)."""

import re
import socket
import time
import urllib.request

from kscale.data import plan_shards
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_worker_metrics_carry_the_node_and_host(tmp_path, ray_local):
    import ray
    from kscale.executors.ray import RayExecutor

    spec = spec_from_dict(extract_spec(tmp_path, name="metrics-node-tag",
                                       resources={"executor": "ray", "workers": 1, "max_retries": 1}))
    result = RayExecutor("tests.integration.placement_stage", show_bar=False).run(
        spec, plan_shards(12, 4), skipped=0, progress_dir=spec.output.path)
    assert result["shards_done"] == 3
    node = ray.get_runtime_context().get_node_id()  # one node: the worker ran on the driver's node
    port = ray._private.worker.global_worker.node.metrics_export_port
    line = None
    deadline = time.monotonic() + 90  # Ray exports actors' metrics every few seconds
    while line is None and time.monotonic() < deadline:
        text = scrape(port)
        line = next((ln for ln in text.splitlines() if ln.startswith("ray_kscale_shards_done")
                     and 'job="metrics-node-tag"' in ln), None)
        if line is None:
            time.sleep(2)
    assert line is not None, "ray_kscale_shards_done of this job never appeared on the metrics endpoint"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    assert labels["node"] == node and labels["host"] == socket.gethostname(), line
    assert float(line.rsplit(" ", 1)[1]) == 3.0, line
