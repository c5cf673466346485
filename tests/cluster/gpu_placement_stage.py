"""The extraction stage on a worker that holds several (declared) GPUs: it records where it runs, then runs
the model whole on the CPU.

``setup`` writes ``<output>/placement/<pid>.json`` with the actor's Ray node id and the GPU ids Ray assigned
to it (``ray.get_gpu_ids()``), then loads the model as :mod:`kscale.extract.worker` does with
``resources.gpus_per_worker: 1``: splitting the model over several devices needs CUDA (``load_model``
refuses ``n_devices > 1`` on the CPU), so on a machine without GPUs only the placement is real.
"""

import dataclasses
import json
import os
from pathlib import Path

from kscale.extract import worker


def setup(spec):
    import ray

    out = Path(spec.output.path) / "placement"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{os.getpid()}.json").write_text(json.dumps({
        "node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}))
    return worker.setup(dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, gpus_per_worker=1)))


def run_shard(spec, shard, state):
    return worker.run_shard(spec, shard, state)
