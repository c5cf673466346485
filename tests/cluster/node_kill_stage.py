"""The extraction stage, except that the first attempt at shard ``s000002`` reports where it runs and waits.

Before waiting, the worker writes its PID and its Ray node id to ``<output>/kill-me.json``, so a test kills
that node's raylet (by the PID the test's own cluster started) while the node holds a known shard. Every other
attempt runs :mod:`kscale.extract.worker` unchanged. ``run_shard_with`` does the same around another stage's
worker module (``tests/cluster/bias_node_kill_stage.py``; a bias shard is ``<variant>.s000002``).
"""

import json
import os
import time
from pathlib import Path

from kscale.extract import worker

VICTIM = "s000002"


def is_victim(name: str) -> bool:
    return name == VICTIM or name.endswith("." + VICTIM)


def run_shard_with(stage, spec, shard, state):
    import ray

    flag = Path(spec.output.path) / f"attempted-{shard.name}"
    if is_victim(shard.name) and not flag.exists():
        flag.write_text(str(os.getpid()))
        note = Path(spec.output.path) / "kill-me.json"
        node = ray.get_runtime_context().get_node_id()
        note.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "node": node, "shard": shard.name}))
        note.with_suffix(".tmp").replace(note)
        time.sleep(120)  # the test kills this node's raylet here
        raise AssertionError("the test did not kill the node")
    return stage.run_shard(spec, shard, state)


def setup(spec):
    return worker.setup(spec)


def run_shard(spec, shard, state):
    return run_shard_with(worker, spec, shard, state)
