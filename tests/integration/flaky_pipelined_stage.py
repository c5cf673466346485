"""A stage with ``start_shard`` (commits on a thread, like extraction) for executor tests.

Shard 1's commit always fails, shard 2's start fails on its first attempt only; every commit takes a
moment, and a start that finds the previous commit still running is written down (overlap happened).
"""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def setup(spec):
    return {"pool": ThreadPoolExecutor(1), "commits": []}


def start_shard(spec, shard, state):
    out = Path(spec.output.path)
    out.mkdir(parents=True, exist_ok=True)
    if not all(f.done() for f in state["commits"]):
        (out / f"overlapped-{shard.name}").write_text("1")
    flag = out / f"attempted-{shard.name}"
    first = not flag.exists()
    flag.write_text("1")
    if shard.index == 2 and first:
        raise RuntimeError("transient")

    def commit():
        time.sleep(0.2)
        if shard.index == 1:
            raise ValueError(f"boom in {shard.name}")
        (out / f"{shard.name}.done").write_text("1")
        return {"shard": shard.name, "n_samples_ok": shard.stop - shard.start, "tokens": {"text": 1},
                "key_bytes": 10}

    state["commits"].append(state["pool"].submit(commit))
    return state["commits"][-1]


def run_shard(spec, shard, state):
    return start_shard(spec, shard, state).result()
