"""Run a stage's shards one after another in this process (tests, debugging, single-GPU boxes)."""

from __future__ import annotations

import importlib
import traceback

from kscale.executors.progress import Progress


class LocalExecutor:
    def __init__(self, stage_module: str, show_bar: bool = True):
        self.stage_module = stage_module
        self.show_bar = show_bar

    def run(self, spec, shards: list, skipped: int, progress_dir: str) -> dict:
        stage = importlib.import_module(self.stage_module)
        prog = Progress(progress_dir, spec.name, spec.kind, len(shards) + skipped, skipped, self.show_bar)
        state = stage.setup(spec) if shards else None
        for shard in shards:
            attempts = spec.resources.max_retries + 1
            for attempt in range(1, attempts + 1):
                try:
                    prog.shard_done(stage.run_shard(spec, shard, state))
                    break
                except Exception as e:  # noqa: BLE001 - a shard's failure is recorded, the job goes on
                    err = f"{type(e).__name__}: {e}"
                    if attempt == attempts:
                        prog.shard_failed(shard.name, err + "\n" + traceback.format_exc(limit=3), attempts)
                    else:
                        prog.shard_retry(shard.name, err)
        return prog.finish()
