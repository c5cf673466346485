"""The bias stage (:mod:`kscale.bias.worker`) held as :mod:`tests.cluster.all_workers_stage` holds extraction:
no shard runs before every worker is set up, so each node's worker scores shards."""

from kscale.bias import worker
from tests.cluster.all_workers_stage import run_shard_with, setup_with


def setup(spec):
    return setup_with(worker, spec)


def run_shard(spec, shard, state):
    return run_shard_with(worker, spec, shard, state)
