"""Streaming map-reduce of chunk statistics on dask: threads by default, a dask.distributed cluster
optionally (a LocalCluster, or an address / scheduler file).

Work is a list of items (anything holding delayed blocks: the analysis passes one joint block, a dict
modality -> (delayed keys, delayed sample ids)) and one function ``fn(item, shared)`` returning
mergeable partial results. At most ``window`` tasks are in flight and every result is
merged into one accumulator as it arrives, so memory is bounded by the window, not by the data.
:meth:`Runner.map_reduce_fused` runs several such (function, shared, merge) parts in ONE pass: each item is
read once and every part's function sees it (:func:`fused_map`); each part keeps its own accumulator and
merge (:class:`FusedMerge`), so its result is the one a pass of its own gives (merged in the same order).

The LocalCluster (``scheduler: distributed`` without an address) is private to this run, like the Slurm
target's dask cluster: every comm is TLS with a per-run self-signed certificate that each role must present
(made by :func:`kscale.targets.slurm.write_dask_tls` in a 0700 folder, removed on exit), and the
scheduler, nanny, worker and dashboard sockets listen on 127.0.0.1 only. Another local user can neither
connect a client nor run code in the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import dask
from dask import delayed

from kscale.spec.analyze import DaskConfig


LOOPBACK = "127.0.0.1"


def local_security(folder: Path) -> Any:
    """A ``distributed.security.Security`` that requires TLS with the certificate and key that
    :func:`kscale.targets.slurm.write_dask_tls` writes into ``folder`` (0700, files 0600): the one
    self-signed pair is the CA, and every role (scheduler, worker, client) presents it, so a peer
    without it is refused in the TLS handshake."""
    from distributed.security import Security

    from kscale.targets.slurm import write_dask_tls

    write_dask_tls(folder)
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    return Security(require_encryption=True, tls_ca_file=cert,
                    tls_client_cert=cert, tls_client_key=key, tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key)


def one_blas_thread():
    """BLAS held to one thread while local dask tasks run (entered and left by the driver thread around a whole
    compute): :func:`kscale.analysis.blas.one_thread`. A dask.distributed worker already runs with one BLAS
    thread (distributed sets ``OPENBLAS_NUM_THREADS=1`` in its workers)."""
    from kscale.analysis.blas import one_thread

    return one_thread()


@dataclass(frozen=True)
class Fused:
    """The shared object of a fused pass: each part's map function and its own shared object."""

    parts: tuple[tuple[Callable, Any], ...]


def fused_map(item: Any, plan: Fused) -> tuple:
    """One item through every part's function, in order: the tuple of their partial results. The functions
    must not modify the item (the next part reads the same arrays)."""
    return tuple(fn(item, shared) for fn, shared in plan.parts)


@dataclass(frozen=True)
class FusedMerge:
    """The reduce step of :func:`fused_map` results: part i merged with merge i (a module-level class:
    picklable for dask.distributed)."""

    merges: tuple[Callable[[Any, Any], Any], ...]

    def __call__(self, a: tuple, b: tuple) -> tuple:
        return tuple(merge(x, y) for merge, x, y in zip(self.merges, a, b, strict=True))


class Runner:
    """Runs windows of delayed tasks on the configured scheduler (a context manager)."""

    def __init__(self, cfg: DaskConfig):
        self.cfg = cfg
        self.client = None
        self._cluster = None
        self._tls_dir: Path | None = None

    def __enter__(self) -> Runner:
        if self.cfg.scheduler == "distributed":
            from distributed import Client, LocalCluster

            if self.cfg.address:
                self.client = Client(self.cfg.address)
            elif self.cfg.scheduler_file:
                self.client = Client(scheduler_file=self.cfg.scheduler_file)
            else:
                self._start_local_cluster(LocalCluster, Client)
        return self

    def _start_local_cluster(self, LocalCluster: type, Client: type) -> None:
        # a new folder (write_dask_tls makes it 0700) inside a fresh 0700 one, removed by __exit__
        self._tls_dir = Path(tempfile.mkdtemp(prefix="kscale-dask-")) / "tls"
        try:
            security = local_security(self._tls_dir)
            self._cluster = LocalCluster(n_workers=self.cfg.n_workers, threads_per_worker=1, processes=True,
                                         protocol="tls", host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0",
                                         security=security)
            self.client = Client(self._cluster, security=security)
        except BaseException:
            self.__exit__()  # __exit__ does not run when __enter__ fails: close what started, drop the keys
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self._cluster is not None:
                self._cluster.close()
        finally:
            if self._tls_dir is not None:
                shutil.rmtree(self._tls_dir.parent, ignore_errors=True)

    @property
    def window(self) -> int:
        return 2 * max(1, self.cfg.n_workers)

    def compute(self, *objs: Any) -> tuple:
        if self.client is not None:
            return tuple(self.client.compute(list(objs), sync=True))
        with one_blas_thread():
            return self._compute_local(*objs)

    def _compute_local(self, *objs: Any) -> tuple:
        if self.cfg.scheduler == "sync":
            return dask.compute(*objs, scheduler="sync")
        return dask.compute(*objs, scheduler="threads", num_workers=self.cfg.n_workers)

    def map_reduce(self, fn: Callable, items: list[Any], shared: Any,
                   merge: Callable[[Any, Any], Any]) -> Any:
        if self.client is not None:
            return self._map_reduce_distributed(fn, items, shared, merge)
        acc = None
        task = delayed(fn, pure=False)
        shared = delayed(shared, name=f"shared-{uuid.uuid4().hex}", traverse=False)
        with one_blas_thread():
            for lo in range(0, len(items), self.window):
                parts = self._compute_local(*[task(item, shared) for item in items[lo:lo + self.window]])
                for part in parts:
                    acc = part if acc is None else merge(acc, part)
        return acc

    def map_reduce_fused(self, items: list[Any], parts: Sequence[tuple[Callable, Any, Callable[[Any, Any], Any]]],
                         ) -> tuple:
        """Several map-reduces over the same ``items`` in one pass (each item read once): ``parts`` are
        (fn, shared, merge) as :meth:`map_reduce` takes them; returns each part's merged result, in order."""
        plan = Fused(tuple((fn, shared) for fn, shared, _ in parts))
        return self.map_reduce(fused_map, items, plan, FusedMerge(tuple(merge for _, _, merge in parts)))

    def _map_reduce_distributed(self, fn, items, shared, merge):
        from distributed import as_completed

        shared_f = self.client.scatter(shared, broadcast=True, hash=False)  # unique key: no release races
        task = delayed(fn, pure=False)
        pending = iter(items)
        futures = [self.client.compute(task(next(pending), shared_f))
                   for _ in range(min(self.window, len(items)))]
        # on our client's loop: as_completed defaults to the *current* client's, another one when the caller
        # holds its own Client (`with Client(...)`), and a result re-fetched after a node died then waits on
        # an event of the wrong loop (RuntimeError: ... bound to a different event loop)
        acc, queue = None, as_completed(futures, loop=self.client.loop)
        for fut in queue:
            part = fut.result()
            acc = part if acc is None else merge(acc, part)
            nxt = next(pending, None)
            if nxt is not None:
                queue.add(self.client.compute(task(nxt, shared_f)))
            fut.release()
        return acc
