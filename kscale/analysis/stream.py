"""Streaming map-reduce of chunk statistics on dask: threads by default, a dask.distributed cluster
optionally (a LocalCluster, or an address / scheduler file).

Work is a list of items (anything holding delayed blocks: the analysis passes one joint block, a dict
modality -> (delayed keys, delayed sample ids)) and one function ``fn(item, shared)`` returning
mergeable partial results. At most ``window`` tasks are in flight and every result is
merged into one accumulator as it arrives, so memory is bounded by the window, not by the data.
"""

from __future__ import annotations

from collections.abc import Callable
import uuid
from typing import Any

import dask
from dask import delayed

from kscale.spec.analyze import DaskConfig


class Runner:
    """Runs windows of delayed tasks on the configured scheduler (a context manager)."""

    def __init__(self, cfg: DaskConfig):
        self.cfg = cfg
        self.client = None
        self._cluster = None

    def __enter__(self) -> Runner:
        if self.cfg.scheduler == "distributed":
            from distributed import Client, LocalCluster

            if self.cfg.address:
                self.client = Client(self.cfg.address)
            elif self.cfg.scheduler_file:
                self.client = Client(scheduler_file=self.cfg.scheduler_file)
            else:
                self._cluster = LocalCluster(n_workers=self.cfg.n_workers, threads_per_worker=1,
                                             dashboard_address=":0", processes=True)
                self.client = Client(self._cluster)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    @property
    def window(self) -> int:
        return 2 * max(1, self.cfg.n_workers)

    def compute(self, *objs: Any) -> tuple:
        if self.client is not None:
            return tuple(self.client.compute(list(objs), sync=True))
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
        for lo in range(0, len(items), self.window):
            parts = self.compute(*[task(item, shared) for item in items[lo:lo + self.window]])
            for part in parts:
                acc = part if acc is None else merge(acc, part)
        return acc

    def _map_reduce_distributed(self, fn, items, shared, merge):
        from distributed import as_completed

        shared_f = self.client.scatter(shared, broadcast=True, hash=False)  # unique key: no release races
        task = delayed(fn, pure=False)
        pending = iter(items)
        futures = [self.client.compute(task(next(pending), shared_f))
                   for _ in range(min(self.window, len(items)))]
        acc, queue = None, as_completed(futures)
        for fut in queue:
            part = fut.result()
            acc = part if acc is None else merge(acc, part)
            nxt = next(pending, None)
            if nxt is not None:
                queue.add(self.client.compute(task(nxt, shared_f)))
            fut.release()
        return acc
