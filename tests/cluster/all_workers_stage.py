"""The extraction stage, except that no shard runs before all ``resources.workers`` workers are set up.

``setup`` writes ``<output>/workers/<pid>.json`` (the worker's Ray node id); ``run_shard`` first waits (up to
180 s) until there are ``resources.workers`` such files. A worker takes shards as soon as it is set up, so on
a loaded machine a worker that starts late (its node joined later, or its model loads slower) may find every
shard already done; holding the first shards until every worker is up makes "each node commits shards"
deterministic. The stage's own files are removed by the tests before the store is compared.
``setup_with`` / ``run_shard_with`` do the same around another stage's worker module
(``tests/cluster/bias_all_workers_stage.py``).
"""

import json
import os
import time
from pathlib import Path

from kscale.extract import worker


def _folder(spec) -> Path:
    return Path(spec.output.path) / "workers"


def setup_with(stage, spec):
    import ray

    state = stage.setup(spec)
    out = _folder(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{os.getpid()}.json").write_text(json.dumps({"node": ray.get_runtime_context().get_node_id()}))
    return state


def run_shard_with(stage, spec, shard, state):
    deadline = time.monotonic() + 180
    while len(list(_folder(spec).glob("*.json"))) < spec.resources.workers and time.monotonic() < deadline:
        time.sleep(0.2)
    return stage.run_shard(spec, shard, state)


def setup(spec):
    return setup_with(worker, spec)


def run_shard(spec, shard, state):
    return run_shard_with(worker, spec, shard, state)


def remove_files(store: str) -> None:
    folder = Path(store) / "workers"
    for f in folder.glob("*.json"):
        f.unlink()
    folder.rmdir()
