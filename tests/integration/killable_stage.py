"""The extraction stage, except that the first attempt at shard ``s000002`` stops and waits to be killed.

Before waiting, the worker process writes its own PID (and the shard) to ``<output>/kill-me.json``, so a
test kills exactly this worker (never another process that happens to look like one) while it holds a
known shard. Every other attempt runs :mod:`kscale.extract.worker` unchanged.
"""

import json
import os
import time
from pathlib import Path

from kscale.extract import worker

VICTIM = "s000002"


def setup(spec):
    return worker.setup(spec)


def run_shard(spec, shard, state):
    flag = Path(spec.output.path) / f"attempted-{shard.name}"
    if shard.name == VICTIM and not flag.exists():
        flag.write_text(str(os.getpid()))
        note = Path(spec.output.path) / "kill-me.json"
        note.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "shard": shard.name}))
        note.with_suffix(".tmp").replace(note)
        time.sleep(300)  # the test kills this process here
        raise AssertionError("the test did not kill the worker")
    return worker.run_shard(spec, shard, state)
