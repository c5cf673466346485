"""Run a stage's shards one after another in this process (tests, debugging, single-GPU boxes)."""

from __future__ import annotations

import importlib
import traceback

from kscale.executors.base import ShardPool


class LocalExecutor(ShardPool):
    def run_shards(self, spec, shards: list) -> None:
        stage = importlib.import_module(self.stage_module)
        state = stage.setup(spec)
        for shard in shards:
            again = True
            while again:
                try:
                    self.done(stage.run_shard(spec, shard, state))
                    break
                except Exception as e:  # noqa: BLE001 - a shard's failure is recorded, the job goes on
                    err = f"{type(e).__name__}: {e}"
                    if self.attempts.get(shard.name, 0) + 1 >= self.max_attempts:  # the last: keep where
                        err += "\n" + traceback.format_exc(limit=3)
                    again = self.failed(shard.name, err)
