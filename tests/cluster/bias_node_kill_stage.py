"""The bias stage (:mod:`kscale.bias.worker`), except that the first attempt at ``<variant>.s000002`` reports
where it runs and waits to be killed, as :mod:`tests.cluster.node_kill_stage` does for extraction."""

from kscale.bias import worker
from tests.cluster.node_kill_stage import run_shard_with


def setup(spec):
    return worker.setup(spec)


def run_shard(spec, shard, state):
    return run_shard_with(worker, spec, shard, state)
