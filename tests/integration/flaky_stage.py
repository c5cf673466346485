"""A stage for executor tests: shard 1 always fails, shard 2 fails on its first attempt only."""

import os
from pathlib import Path


def setup(spec):
    return {"pid": os.getpid()}


def run_shard(spec, shard, state):
    flag = Path(spec.output.path) / f"attempted-{shard.name}"
    first = not flag.exists()
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text("1")
    if shard.index == 1:
        raise ValueError(f"boom in {shard.name}")
    if shard.index == 2 and first:
        raise RuntimeError("transient")
    return {"shard": shard.name, "n_samples_ok": shard.stop - shard.start, "tokens": {"text": 1}, "key_bytes": 10}
