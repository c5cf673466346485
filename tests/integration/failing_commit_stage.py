"""The extraction stage, except that the first attempt at shard ``s000001`` fails in its background commit.

The shard's forwards and appends run as usual (:func:`kscale.extract.worker.start_shard`); its
``ShardWriter.commit``, which runs on the drain thread behind the next shard's forwards, raises instead
of writing the marker. Every other attempt runs the worker unchanged.
"""

from pathlib import Path

from kscale.extract import worker

VICTIM = "s000001"


def setup(spec):
    return worker.setup(spec)


def _failing_writer(spec, shard, state):
    w = _real_writer(spec, shard, state)

    def commit(stats, errors):
        w.pool.shutdown(wait=True)
        raise OSError(f"injected: the background commit of {shard.name} failed")

    w.commit = commit
    return w


_real_writer = worker._writer


def start_shard(spec, shard, state):
    flag = Path(spec.output.path) / f"attempted-{shard.name}"
    first = not flag.exists()
    flag.write_text("1")
    if shard.name != VICTIM or not first:
        return worker.start_shard(spec, shard, state)
    worker._writer = _failing_writer
    try:
        return worker.start_shard(spec, shard, state)
    finally:
        worker._writer = _real_writer


def run_shard(spec, shard, state):
    return start_shard(spec, shard, state).result()
