"""Run a stage's shards one after another in this process (tests, debugging, single-GPU boxes).

A stage that has ``start_shard(spec, shard, state) -> Future[marker]`` (extraction) gets its shard
commits overlapped: shard k+1 starts before shard k's future is resolved, and shard k is reported done
(or retried) only when its future resolved, i.e. after its marker is on disk. Retries run
``run_shard`` synchronously.
"""

from __future__ import annotations

import importlib
import traceback
from concurrent.futures import Future

from kscale.executors.progress import Progress


class LocalExecutor:
    def __init__(self, stage_module: str, show_bar: bool = True):
        self.stage_module = stage_module
        self.show_bar = show_bar

    def run(self, spec, shards: list, skipped: int, progress_dir: str) -> dict:
        stage = importlib.import_module(self.stage_module)
        prog = Progress(progress_dir, spec.name, spec.kind, len(shards) + skipped, skipped, self.show_bar)
        state = stage.setup(spec) if shards else None
        pending = None  # (shard, future of its marker): a commit that may still be running
        for shard in shards:
            started = self._start(stage, spec, shard, state)
            if pending is not None:
                self._finish(stage, spec, state, prog, *pending)
            pending = (shard, started)
        if pending is not None:
            self._finish(stage, spec, state, prog, *pending)
        return prog.finish()

    @staticmethod
    def _start(stage, spec, shard, state) -> Future:
        fut: Future = Future()
        try:
            if hasattr(stage, "start_shard"):
                return stage.start_shard(spec, shard, state)
            fut.set_result(stage.run_shard(spec, shard, state))
        except Exception as e:  # noqa: BLE001 - becomes attempt 1's failure in _finish
            fut.set_exception(e)
        return fut

    @staticmethod
    def _finish(stage, spec, state, prog: Progress, shard, fut: Future) -> None:
        attempts = spec.resources.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                prog.shard_done(fut.result() if attempt == 1 else stage.run_shard(spec, shard, state))
                return
            except Exception as e:  # noqa: BLE001 - a shard's failure is recorded, the job goes on
                err = f"{type(e).__name__}: {e}"
                if attempt == attempts:
                    prog.shard_failed(shard.name, err + "\n" + traceback.format_exc(limit=3), attempts)
                else:
                    prog.shard_retry(shard.name, err)
