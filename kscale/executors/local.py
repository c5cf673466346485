"""Run a stage's shards one after another in this process (tests, debugging, single-GPU boxes).

A stage that has ``start_shard(spec, shard, state) -> Future[marker]`` (extraction) gets its shard
commits overlapped: shard k+1 starts before shard k's future is resolved, and shard k is reported done
(or failed) only when its future resolved, i.e. after its marker is on disk. Retries run ``run_shard``
synchronously.
"""

from __future__ import annotations

import importlib
import traceback
from concurrent.futures import Future

from kscale.executors.base import ShardPool
from kscale.output import LockLost


class LocalExecutor(ShardPool):
    def run_shards(self, spec, shards: list) -> None:
        stage = importlib.import_module(self.stage_module)
        state = stage.setup(spec)
        pending = None  # (shard, future of its marker): a commit that may still be running
        for shard in shards:
            started = self._start(stage, spec, shard, state)
            if pending is not None:
                self._finish(stage, spec, state, *pending)
            pending = (shard, started)
        if pending is not None:
            self._finish(stage, spec, state, *pending)

    @staticmethod
    def _start(stage, spec, shard, state) -> Future:
        fut: Future = Future()
        try:
            if hasattr(stage, "start_shard"):
                return stage.start_shard(spec, shard, state)
            fut.set_result(stage.run_shard(spec, shard, state))
        except Exception as e:  # noqa: BLE001 - becomes the first attempt's failure in _finish
            fut.set_exception(e)
        return fut

    def _finish(self, stage, spec, state, shard, fut: Future) -> None:
        first, again = True, True
        while again:
            try:
                self.done(fut.result() if first else stage.run_shard(spec, shard, state))
                return
            except LockLost:  # not the shard's failure: the run lost its output and stops here
                raise
            except Exception as e:  # noqa: BLE001 - a shard's failure is recorded, the job goes on
                err = f"{type(e).__name__}: {e}"
                if self.attempts.get(shard.name, 0) + 1 >= self.max_attempts:  # the last: keep where
                    err += "\n" + traceback.format_exc(limit=3)
                again = self.failed(shard.name, err)
            first = False
