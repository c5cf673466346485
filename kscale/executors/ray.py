"""A pool of named Ray actors that pull shards dynamically, with restarts, retries and quarantine.

One actor per worker (``num_gpus`` from the spec; CPU actors where there is none). An actor gets shards only
once its ``ready`` call returned (Ray placed it and its constructor set the stage up), so a worker the cluster
has no room for holds none (:meth:`RayExecutor.run_shards` says what happens when none can be placed, and
:meth:`RayExecutor._check_head` when the head is lost). Each shard is two
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
import socket
import sys
import time
from collections import deque
from concurrent.futures import Future

import ray
from tqdm import tqdm

from kscale.errors import KscaleError
from kscale.executors.base import ShardPool

_POLL_S = 1.0  # how often the driver looks at the placement clock while nothing returns
_HEAD_CHECK_S = 5.0  # how often, while nothing returns, the driver checks that the head's GCS answers
_HEAD_GRACE_S = 15.0  # the GCS silent this long: the head is lost (Ray itself ends the driver after 60 s)


class RayPoolError(KscaleError):
    """The Ray pool cannot go on (the CLI prints it without a traceback, exit status 2); what is committed stays."""


class PlacementError(RayPoolError):
    """No worker could be placed (no node has what ``resources.*`` asks for), or none could start."""


class RayHeadLost(RayPoolError):
    """The cluster's head (its GCS) stopped answering mid-run; a rerun on a live cluster resumes."""


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
        # node and host tags: on a many-node cluster each worker's series says where it runs (Prometheus also
        # scrapes each node separately, but its labels are the scrape target's, not Ray's node id)
        tags = {"job": spec.name, "stage": spec.kind, "node": self.node, "host": socket.gethostname()}
        keys = ("job", "stage", "node", "host")
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

    def ready(self) -> str:
        """Answers once the constructor returned (Ray placed the actor and the stage is set up): its node id."""
        return self.node

    def pid(self) -> int:
        return os.getpid()


def _gist(msg: str) -> str:
    """First and last lines of a Ray error (the last names the cause, e.g. a failed constructor)."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0][:300] if len(lines) == 1 else f"{lines[0][:300]} ... {lines[-1][:300]}"


def alive_node_resources() -> str:
    """"4 CPU/2 GPU, 2 CPU/0 GPU" for the cluster's alive nodes ("none"; without the list when the GCS does
    not answer): what a placement error tells the user the cluster has."""
    nodes = []
    try:
        for nd in ray.nodes():
            if nd.get("Alive"):
                res = nd.get("Resources", {})
                nodes.append(f"{res.get('CPU', 0):g} CPU/{res.get('GPU', 0):g} GPU")
    except Exception:  # noqa: BLE001 - the GCS did not answer: the message goes without the node list
        pass
    return ", ".join(nodes) or "none"


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
        self.head_lost = False  # set when the head's GCS stopped answering (:meth:`_check_head`)

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
        """Shards go only to placed workers: each actor first answers ``ready`` (its constructor returned, so Ray
        found it a node and the stage is set up); until then it holds no shard. So workers that the cluster has
        no room for (more workers than it holds, or no room left after a node loss) wait without holding work,
        and the placed ones do it all. While no worker at all is placed for ``resources.placement_timeout_s``
        the run fails naming the resources each worker asks for (:meth:`_unplaceable`); a slot whose constructor
        fails ``max_retries + 1`` times in a row is given up, and the run fails when no slot is left."""
        n = min(spec.resources.workers, len(shards))
        self.actors = [None] * n
        generation = [0] * n
        placed = [False] * n  # the constructor returned: the worker takes shards
        starting = [False] * n  # a ``start`` in flight: the actor takes its next shard when it returns
        ctor_failures = [0] * n  # constructor failures of each slot in a row
        retired = [False] * n  # a slot given up after too many constructor failures
        node: list[str | None] = [None] * n  # the Ray node of each actor, known once it is placed
        pending = deque(shards)
        inflight: dict = {}  # ObjectRef -> (call, worker index, actor generation, shard)

        def launch(i: int) -> None:
            self.actors[i] = self._make_actor(spec, i, generation[i])
            placed[i] = starting[i] = False
            inflight[self.actors[i].ready.remote()] = ("ready", i, generation[i], None)

        def start(i: int) -> None:
            if placed[i] and pending and not starting[i]:
                shard = pending.popleft()
                inflight[self.actors[i].start.remote(shard)] = ("start", i, generation[i], shard)
                starting[i] = True

        def working() -> bool:  # shards left, or some in flight (a ``ready`` alone is no work)
            return bool(pending) or any(c[0] != "ready" for c in inflight.values())

        try:
            for i in range(n):
                launch(i)
            unplaced_since: float | None = time.monotonic()  # since when no worker is placed (None: one is)
            last_head_check = time.monotonic()
            while working():
                if not inflight:
                    raise PlacementError("no Ray worker could start (see the errors above)")
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_POLL_S)
                if any(placed):
                    unplaced_since = None
                elif unplaced_since is None:
                    unplaced_since = time.monotonic()
                if not ready:
                    waited = time.monotonic() - unplaced_since if unplaced_since is not None else 0.0
                    if waited > spec.resources.placement_timeout_s:
                        raise PlacementError(self._unplaceable(spec, waited))
                    if time.monotonic() - last_head_check > _HEAD_CHECK_S:
                        last_head_check = time.monotonic()
                        self._check_head(spec)
                    continue
                call, i, gen, shard = inflight.pop(ready[0])
                current = gen == generation[i]  # else the actor was replaced since this call was sent
                if call == "start" and current:
                    starting[i] = False
                try:
                    result = ray.get(ready[0])
                    if call == "start" and not current:  # its commit was on the actor that is gone
                        raise ray.exceptions.RayActorError()
                except ray.exceptions.RayActorError as e:  # the worker process died (each of its calls says so)
                    self._check_head(spec)  # or the head is gone: then no worker can be replaced
                    err = f"worker died: {type(e).__name__}: {_gist(str(e))}"
                    if current:
                        self.progress.actor_replaced(node[i], node_alive(node[i]))
                        node[i] = None
                        generation[i] += 1
                        ctor_failures[i] = ctor_failures[i] + 1 if call == "ready" else 0
                        if ctor_failures[i] >= self.max_attempts:  # its constructor fails: not a shard's fault
                            retired[i], self.actors[i], placed[i] = True, None, False
                            tqdm.write(f"kscale: worker {i} failed to start {ctor_failures[i]} times, given up: "
                                       f"{err}", file=sys.stderr)
                            if all(retired):
                                raise PlacementError(f"no Ray worker could start ({ctor_failures[i]} tries each): "
                                                   f"{err}") from None
                        else:
                            launch(i)
                    if call == "ready":  # no shard was given to it
                        continue
                except ray.exceptions.RayTaskError as e:  # the shard raised (its forwards or its commit)
                    cause = e.cause if e.cause is not None else e
                    err = f"{type(cause).__name__}: {str(cause).splitlines()[0][:500] if str(cause) else ''}"
                else:
                    if call == "ready":  # placed: from now on it takes shards
                        if current:
                            placed[i], node[i], ctor_failures[i] = True, result, 0
                            start(i)
                    elif call == "start":  # the next shard's forwards run while this one commits
                        node[i] = result
                        self.at_node[shard.name] = result
                        inflight[self.actors[i].finish.remote(shard.name)] = ("finish", i, gen, shard)
                        start(i)
                    else:  # committed: its marker is on disk
                        self.done(result, self.at_node.get(shard.name))
                    continue
                if self.failed(shard.name, err):
                    pending.appendleft(shard)
                for j in range(n):  # to a placed worker that is free
                    start(j)
        finally:
            for a in self.actors:
                if a is not None and not self.head_lost:  # without a GCS, ray.kill would wait for it
                    ray.kill(a, no_restart=True)
            self.actors = []

    def _check_head(self, spec) -> None:
        """Raise :class:`RayHeadLost` when the head's GCS refuses connections for ``_HEAD_GRACE_S`` seconds (a
        plain TCP connect: every Ray call would instead wait for the GCS, and Ray ends the driver process
        with a raw log line after 60 s). A GCS that answers again within the grace (a restart) is no loss."""
        address = ray.get_runtime_context().gcs_address
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + _HEAD_GRACE_S
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                return
            except OSError as e:
                reason = e
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        self.head_lost = True
        done = self.progress.done + self.progress.skipped if self.progress else 0
        total = self.progress.total if self.progress else "?"
        raise RayHeadLost(
            f"lost the Ray cluster's head: its GCS at {address} has not answered for {_HEAD_GRACE_S:.0f} s "
            f"({reason}); the head node or its gcs_server died. {done} of {total} shards are committed in "
            f"{spec.output.path} and kept: start the cluster again and rerun the same job to resume")

    @staticmethod
    def _unplaceable(spec, waited: float) -> str:
        """Why the run gives up: what one worker asks for, and what the cluster's nodes have."""
        r = spec.resources
        return (f"no Ray worker could be placed in {waited:.0f} s: each asks for resources.cpus_per_worker="
                f"{r.cpus_per_worker:g} CPUs and resources.gpus_per_worker={r.gpus_per_worker:g} GPUs on one node, "
                f"and the cluster's alive nodes have {alive_node_resources()} in all. Lower "
                f"resources.gpus_per_worker / resources.cpus_per_worker, add nodes, or wait longer "
                f"(resources.placement_timeout_s={r.placement_timeout_s:g})")
