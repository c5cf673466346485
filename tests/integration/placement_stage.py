"""A stage for the placement tests: every shard succeeds and names the worker process that ran it; when the
job's name contains ``setup-fails``, ``setup`` (the actor's constructor) raises."""

import os


def setup(spec):
    if "setup-fails" in spec.name:
        raise OSError("no such model here (on purpose)")
    return {"pid": os.getpid()}


def run_shard(spec, shard, state):
    return {"shard": shard.name, "n_samples_ok": shard.stop - shard.start, "tokens": {"text": 1}, "key_bytes": 10,
            "pid": state["pid"]}
