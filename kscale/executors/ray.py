"""A pool of named Ray actors that pull shards dynamically, with restarts, retries and quarantine.

One actor per worker (``num_gpus`` from the spec; CPU actors where there is none). Each shard is two
calls on its actor: ``start`` (the forwards; extraction's commit goes on on the actor's drain thread)
and ``finish`` (waits for that commit and returns the marker, on a thread of its own). When shard k's
``start`` returns the driver sends its ``finish`` and shard k+1's ``start`` at once, so shard k commits
behind shard k+1's forwards, as in :class:`~kscale.executors.local.LocalExecutor`; a shard is reported
done only when ``finish`` returned, i.e. its marker is on disk, and a failed background commit fails
that shard, which is redone. A dead actor (killed process, OOM, node loss) is replaced and every shard
it held is requeued; a shard that raises is retried up to ``resources.max_retries`` times, then quarantined with
its error (the retry/quarantine rule is :class:`~kscale.executors.base.ShardPool`'s). Actors export counters with ``ray.util.metrics`` for the dashboard.
Actors are scheduled ``SPREAD`` over the cluster's nodes; ``start`` returns the actor's node id, so the
progress file says which node committed each shard and which nodes were lost (docs/cluster.md, multi-node).
"""

from __future__ import annotations

import importlib
import os
from collections import deque
from concurrent.futures import Future

import ray

from kscale.executors.base import ShardPool


@ray.remote(concurrency_groups={"commit": 1})
class ShardActor:
    """Holds a stage's state (the model) for many shards. ``start`` runs in the actor's default group, one
    call at a time; ``finish`` in the ``commit`` group, on its own thread, so waiting for shard k's
    commit never holds up shard k+1's forwards, and k is reported as soon as its marker is written."""

    def __init__(self, stage_module: str, spec, torch_threads: int):
        import torch
        from ray.util import metrics

        torch.set_num_threads(torch_threads)
        self.spec = spec
        self.node = ray.get_runtime_context().get_node_id()  # reported with every shard (per-node progress)
        self.stage = importlib.import_module(stage_module)
        self.state = self.stage.setup(spec)
        self.commits: dict[str, Future] = {}  # shard name -> its commit, started and not yet finished
        tags = {"job": spec.name, "stage": spec.kind}
        keys = ("job", "stage")
        self.m_shards = metrics.Counter("kscale_shards_done", "Shards committed", tag_keys=keys)
        self.m_samples = metrics.Counter("kscale_samples_done", "Samples processed", tag_keys=keys)
        self.m_tokens = metrics.Counter("kscale_tokens_written", "Tokens written", tag_keys=keys)
        self.m_bytes = metrics.Counter("kscale_key_bytes_written", "Key bytes written", tag_keys=keys)
        self.m_seconds = metrics.Gauge("kscale_shard_seconds", "Seconds of the last shard", tag_keys=keys)
        for m in (self.m_shards, self.m_samples, self.m_tokens, self.m_bytes, self.m_seconds):
            m.set_default_tags(tags)

    def start(self, shard) -> str:
        """Run the shard's forwards; its commit may go on behind the next ``start`` (``finish`` waits for it).
        Returns the id of the Ray node this actor runs on.

        A stage with ``start_shard`` (extraction) returns its commit as a future; any other stage runs the
        shard whole here. Raising here means nothing of the shard is still being written."""
        if hasattr(self.stage, "start_shard"):
            self.commits[shard.name] = self.stage.start_shard(self.spec, shard, self.state)
        else:
            done: Future = Future()
            done.set_result(self.stage.run_shard(self.spec, shard, self.state))
            self.commits[shard.name] = done
        return self.node

    @ray.method(concurrency_group="commit")
    def finish(self, name: str) -> dict:
        """Wait for shard ``name``'s commit and return its marker; a failed background commit raises here."""
        marker = self.commits.pop(name).result()
        self.m_shards.inc(1)
        for counter, value in ((self.m_samples, marker.get("n_samples_ok", 0)),
                               (self.m_tokens, sum(marker.get("tokens", {}).values())),
                               (self.m_bytes, marker.get("key_bytes", 0))):
            if value:  # Ray counters refuse inc(0)
                counter.inc(value)
        self.m_seconds.set(marker.get("seconds", 0.0))
        return marker

    def pid(self) -> int:
        return os.getpid()


def _gist(msg: str) -> str:
    """First and last lines of a Ray error (the last names the cause, e.g. a failed constructor)."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0][:300] if len(lines) == 1 else f"{lines[0][:300]} ... {lines[-1][:300]}"


def node_alive(node_id: str | None) -> bool | None:
    """Whether the GCS still lists Ray node ``node_id`` as alive (None: unknown node or no answer)."""
    if node_id is None:
        return None
    try:
        for n in ray.nodes():
            if n.get("NodeID") == node_id:
                return bool(n.get("Alive"))
    except Exception:  # noqa: BLE001 - the GCS is unreachable: say nothing rather than fail the run
        return None
    return None


class RayExecutor(ShardPool):
    def __init__(self, stage_module: str, show_bar: bool = True):
        super().__init__(stage_module, show_bar)
        self.actors: list = []
        self.at_node: dict[str, str] = {}  # shard name -> node of the actor whose ``start`` ran it last

    def _make_actor(self, spec, i: int, generation: int):
        r = spec.resources
        name = f"kscale-{spec.name}-{spec.kind}-w{i}" + (f"-r{generation}" if generation else "")
        threads = r.torch_threads or max(1, int(r.cpus_per_worker))
        # SPREAD: workers go to different nodes while there are free ones (a lost node takes fewer of them,
        # and each node's disk and network serve fewer writers); a replacement lands wherever there is room.
        return ShardActor.options(name=name, num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                                  max_restarts=0, max_concurrency=1, scheduling_strategy="SPREAD").remote(
                                      self.stage_module, spec, threads)

    def run_shards(self, spec, shards: list) -> None:
        n = min(spec.resources.workers, len(shards))
        generation = [0] * n
        self.actors = [self._make_actor(spec, i, 0) for i in range(n)]
        pending = deque(shards)
        inflight: dict = {}  # ObjectRef -> (call, worker index, actor generation, shard)
        starting = [False] * n  # a ``start`` in flight: the actor takes its next shard when it returns
        node: list[str | None] = [None] * n  # the Ray node of each actor, known once a ``start`` returned

        def start(i: int) -> None:
            if pending and not starting[i]:
                shard = pending.popleft()
                inflight[self.actors[i].start.remote(shard)] = ("start", i, generation[i], shard)
                starting[i] = True

        try:
            for i in range(n):
                start(i)
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                call, i, gen, shard = inflight.pop(ready[0])
                current = gen == generation[i]  # else the actor was replaced since this call was sent
                if call == "start" and current:
                    starting[i] = False
                try:
                    result = ray.get(ready[0])
                    if call == "start" and not current:  # its commit was on the actor that is gone
                        raise ray.exceptions.RayActorError()
                except ray.exceptions.RayActorError as e:  # the worker process died (each of its calls says so)
                    err = f"worker died: {type(e).__name__}: {_gist(str(e))}"
                    if current:
                        self.progress.actor_replaced(node[i], node_alive(node[i]))
                        node[i] = None
                        generation[i] += 1
                        self.actors[i] = self._make_actor(spec, i, generation[i])
                        starting[i] = False
                except ray.exceptions.RayTaskError as e:  # the shard raised (its forwards or its commit)
                    cause = e.cause if e.cause is not None else e
                    err = f"{type(cause).__name__}: {str(cause).splitlines()[0][:500] if str(cause) else ''}"
                else:
                    if call == "start":  # the next shard's forwards run while this one commits
                        node[i] = result
                        self.at_node[shard.name] = result
                        inflight[self.actors[i].finish.remote(shard.name)] = ("finish", i, gen, shard)
                        start(i)
                    else:  # committed: its marker is on disk
                        self.done(result, self.at_node.get(shard.name))
                    continue
                if self.failed(shard.name, err):
                    pending.appendleft(shard)
                for j in range(n):
                    start(j)
        finally:
            for a in self.actors:
                ray.kill(a, no_restart=True)
            self.actors = []
