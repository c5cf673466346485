"""A pool of named Ray actors that pull shards dynamically, with restarts, retries and quarantine.

One actor per worker (``num_gpus`` from the spec; CPU actors where there is none). The driver keeps
one shard in flight per actor; a dead actor (killed process, OOM, node loss) is replaced and its shard
requeued; a shard that raises is retried up to ``resources.max_retries`` times, then quarantined with
its error (the retry/quarantine rule is :class:`~kscale.executors.base.ShardPool`'s). Actors export counters with ``ray.util.metrics`` for the dashboard.
"""

from __future__ import annotations

import importlib
import os
from collections import deque

import ray

from kscale.executors.base import ShardPool


@ray.remote
class ShardActor:
    def __init__(self, stage_module: str, spec, torch_threads: int):
        import torch
        from ray.util import metrics

        torch.set_num_threads(torch_threads)
        self.spec = spec
        self.stage = importlib.import_module(stage_module)
        self.state = self.stage.setup(spec)
        tags = {"job": spec.name, "stage": spec.kind}
        keys = ("job", "stage")
        self.m_shards = metrics.Counter("kscale_shards_done", "Shards committed", tag_keys=keys)
        self.m_samples = metrics.Counter("kscale_samples_done", "Samples processed", tag_keys=keys)
        self.m_tokens = metrics.Counter("kscale_tokens_written", "Tokens written", tag_keys=keys)
        self.m_bytes = metrics.Counter("kscale_key_bytes_written", "Key bytes written", tag_keys=keys)
        self.m_seconds = metrics.Gauge("kscale_shard_seconds", "Seconds of the last shard", tag_keys=keys)
        for m in (self.m_shards, self.m_samples, self.m_tokens, self.m_bytes, self.m_seconds):
            m.set_default_tags(tags)

    def run(self, shard) -> dict:
        marker = self.stage.run_shard(self.spec, shard, self.state)
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


class RayExecutor(ShardPool):
    def __init__(self, stage_module: str, show_bar: bool = True):
        super().__init__(stage_module, show_bar)
        self.actors: list = []

    def _make_actor(self, spec, i: int, generation: int):
        r = spec.resources
        name = f"kscale-{spec.name}-{spec.kind}-w{i}" + (f"-r{generation}" if generation else "")
        threads = r.torch_threads or max(1, int(r.cpus_per_worker))
        return ShardActor.options(name=name, num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                                  max_restarts=0, max_concurrency=1).remote(self.stage_module, spec, threads)

    def run_shards(self, spec, shards: list) -> None:
        n = min(spec.resources.workers, len(shards))
        generation = [0] * n
        self.actors = [self._make_actor(spec, i, 0) for i in range(n)]
        pending = deque(shards)
        inflight: dict = {}  # ObjectRef -> (worker index, shard)
        idle = deque(range(n))
        try:
            while pending or inflight:
                while idle and pending:
                    i, shard = idle.popleft(), pending.popleft()
                    inflight[self.actors[i].run.remote(shard)] = (i, shard)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    i, shard = inflight.pop(ref)
                    try:
                        self.done(ray.get(ref))
                        idle.append(i)
                        continue
                    except ray.exceptions.RayActorError as e:  # the worker process died
                        err = f"worker died: {type(e).__name__}: {_gist(str(e))}"
                        generation[i] += 1
                        self.actors[i] = self._make_actor(spec, i, generation[i])
                    except ray.exceptions.RayTaskError as e:  # the shard raised
                        cause = e.cause if e.cause is not None else e
                        err = f"{type(cause).__name__}: {str(cause).splitlines()[0][:500] if str(cause) else ''}"
                    idle.append(i)
                    if self.failed(shard.name, err):
                        pending.appendleft(shard)
        finally:
            for a in self.actors:
                ray.kill(a, no_restart=True)
            self.actors = []
