"""A stage for the placement tests: the first attempt at shard ``s000001`` fails (so its retry is handed out
again, while a worker may be waiting to be placed), every other attempt succeeds; when the job's name
contains ``setup-fails``, ``setup`` (the actor's constructor) raises."""

import os
from pathlib import Path


def setup(spec):
    if "setup-fails" in spec.name:
        raise OSError("no such model here (on purpose)")
    return {"pid": os.getpid()}


def run_shard(spec, shard, state):
    flag = Path(spec.output.path) / f"attempted-{shard.name}"
    first = not flag.exists()
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text(str(state["pid"]))
    if shard.name == "s000001" and first:
        raise RuntimeError("transient (on purpose)")
    return {"shard": shard.name, "n_samples_ok": shard.stop - shard.start, "tokens": {"text": 1}, "key_bytes": 10}
