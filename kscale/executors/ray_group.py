"""N ranks of one torch.distributed job as Ray actors, started the way ``torchrun`` starts processes.

Where :class:`~kscale.executors.ray.RayExecutor` hands independent shards to a pool, some work splits
itself across ranks that talk to each other (lmms-eval gives rank r every N-th document of each task and
gathers the answers on rank 0). :func:`run_ranks` gives such work a process group on a Ray cluster:

1. a placement group reserves ``resources.workers`` bundles of ``cpus_per_worker`` CPUs and
   ``gpus_per_worker`` GPUs, all or none (ranks wait for each other in collectives, so a partial group
   would hang), packed onto as few nodes as fit (Ray Train's default);
2. one :class:`RankActor` per bundle; each answers where it runs (node id and IP, PID, host);
3. the rendezvous is the one ``torchrun`` sets up: ``MASTER_ADDR`` is 127.0.0.1 when every rank is on one
   node (and gloo's sockets are bound to the loopback interface), else the rank-0 actor's node IP;
   ``MASTER_PORT`` the port of the rendezvous store, which the rank-0 actor serves bound to that address
   only (:func:`serve_store`, as torchrun's agent serves it; every rank a client); ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` per actor. The backend is the rank function's business (gloo on
   CPU, NCCL on GPUs: it calls ``init_process_group``, as it does under torchrun);
4. every actor calls the same ``module:function(spec, **kwargs)`` -- the code a torchrun rank runs -- and
   the driver returns rank 0's value.

A rank that raises or dies (killed, OOM, node lost) fails the whole group: the other ranks would wait in
their collectives, so every actor is killed and :class:`RankFailed` names the first rank that died (else
the first that raised), its PID and node. Nothing is retried here: the work's own files decide what a
rerun redoes (the eval stage resumes from its per-variant run files).

Each actor sees only its own GPUs (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor), so for the device it is
alone on its node: ``LOCAL_RANK`` is 0 and ``cuda`` means its GPU.
"""

from __future__ import annotations

import importlib
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import ray

from kscale.executors.ray import PlacementError, RayPoolError, _gist, alive_node_resources

_GRACE_S = 10.0  # after the first failure, how long the other ranks get to report theirs (a death outranks
# the connection errors it causes on its peers)


class RankFailed(RayPoolError):
    """A rank of the group raised or died; the group was stopped."""

    def __init__(self, message: str, rank: int, died: bool):
        super().__init__(message)
        self.rank, self.died = rank, died


@dataclass(frozen=True)
class Placement:
    """Where one rank's actor runs."""

    node_id: str
    node_ip: str
    pid: int
    host: str


@ray.remote
class RankActor:
    """One rank: holds nothing between calls but the process (a Ray worker of its own)."""

    def __init__(self, torch_threads: int):
        import torch

        torch.set_num_threads(torch_threads)

    def where(self) -> Placement:
        ctx = ray.get_runtime_context()
        return Placement(ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid(), socket.gethostname())

    def serve_store(self, host: str) -> int:
        """Host the group's rendezvous store on ``host`` (rank 0's actor); returns its port."""
        self.store = serve_store(host)
        return self.store[1]

    def run(self, env: dict[str, str], entry: str, spec: Any, kwargs: dict[str, Any]) -> Any:
        os.environ.update(env)
        module, function = entry.split(":")
        return getattr(importlib.import_module(module), function)(spec, **kwargs)


def serve_store(host: str) -> tuple[Any, int]:
    """(store, port): torch's ``TCPStore`` served from a socket bound to ``host`` only, as torchrun's agent
    serves it; the ranks join it as clients (``TORCHELASTIC_USE_AGENT_STORE``). Left to
    ``init_process_group``, rank 0 would serve it on every interface. Keep the store alive for the run."""
    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, master_listen_fd=listener.fileno())
    listener.detach()  # the store owns the descriptor now (and closes it)
    return store, port


def rendezvous(places: list[Placement]) -> tuple[str, bool]:
    """(MASTER_ADDR, whether all ranks share one node): loopback on one node, else rank 0's node IP."""
    one_node = len({p.node_id for p in places}) == 1
    return ("127.0.0.1" if one_node else places[0].node_ip), one_node


def rank_env(places: list[Placement], master: str, port: int, one_node: bool) -> list[dict[str, str]]:
    """Each rank's environment, as torchrun sets it (``LOCAL_RANK`` 0: an actor sees only its own GPUs)."""
    envs = []
    for rank, _ in enumerate(places):
        env = {"RANK": str(rank), "WORLD_SIZE": str(len(places)), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "GROUP_RANK": str(rank), "MASTER_ADDR": master, "MASTER_PORT": str(port),
               "TORCHELASTIC_USE_AGENT_STORE": "True"}  # every rank a client of serve_store's store
        if one_node and "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in dict(socket.if_nameindex()).values():
            env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pair sockets on loopback too (else: the hostname's address)
        envs.append(env)
    return envs


def run_ranks(spec: Any, entry: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``entry`` (``module:function``) as ``function(spec, **kwargs)`` on ``resources.workers`` ranks of
    one process group on the connected Ray cluster; returns rank 0's value (see the module docstring)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    r = spec.resources
    n = r.workers
    bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    tag = f"kscale-{spec.name}-{spec.kind}-{secrets.token_hex(3)}"  # a rerun in the same Ray: its own names
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK", name=tag)
    actors: list = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=r.placement_timeout_s)
        if not ready:
            raise PlacementError(_unplaceable(spec, n, bundle))
        threads = r.torch_threads or max(1, int(r.cpus_per_worker))
        actors = [RankActor.options(
            name=f"{tag}-rank{i}", num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
            max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(threads) for i in range(n)]
        try:
            places: list[Placement] = ray.get([a.where.remote() for a in actors])
        except ray.exceptions.RayActorError as e:
            raise PlacementError(f"a rank's Ray actor failed to start: {_gist(str(e))}") from None
        master, one_node = rendezvous(places)
        port = ray.get(actors[0].serve_store.remote(master))
        envs = rank_env(places, master, port, one_node)
        refs = {a.run.remote(env, entry, spec, kwargs or {}): i for i, (a, env) in enumerate(zip(actors, envs))}
        return _gather(refs, places)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def _gather(refs: dict, places: list[Placement]) -> Any:
    """Rank 0's value once every rank returned; on the first failure, the failures seen within the grace."""
    values: dict[int, Any] = {}
    failures: list[tuple[int, BaseException]] = []
    deadline: float | None = None
    pending = list(refs)
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:  # the grace is over: the ranks still running are stopped by the caller
            break
        rank = refs[done[0]]
        try:
            values[rank] = ray.get(done[0])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            failures.append((rank, e))
            deadline = deadline or time.monotonic() + _GRACE_S
    if not failures:
        return values[0]
    died = [(k, e) for k, e in failures if isinstance(e, ray.exceptions.RayActorError)]
    rank, err = (died or failures)[0]
    p = places[rank]
    if died:
        what = f"died ({type(err).__name__}: {_gist(str(err))})"
    else:
        cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None else err
        what = f"raised {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500] if str(cause) else ''}"
    raise RankFailed(f"rank {rank} of {len(places)} (Ray actor pid {p.pid} on {p.host}, node {p.node_id[:12]}) "
                     f"{what}", rank, bool(died)) from None


def _unplaceable(spec: Any, n: int, bundle: dict[str, float]) -> str:
    r = spec.resources
    return (f"the {n} ranks (resources.workers) could not all be placed in {r.placement_timeout_s:g} s: they run "
            f"at once, each with resources.cpus_per_worker={r.cpus_per_worker:g} CPUs and "
            f"resources.gpus_per_worker={r.gpus_per_worker:g} GPUs on one node ({bundle}), and the cluster's "
            f"alive nodes have {alive_node_resources()}. Lower resources.workers or the per-worker "
            f"resources, add nodes, or wait longer (resources.placement_timeout_s)")
