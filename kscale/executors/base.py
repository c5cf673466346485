"""What every shard pool shares: the stage module contract, progress, retries and quarantine.

A stage is a module with ``setup(spec) -> state`` (once per worker, e.g. load the model) and
``run_shard(spec, shard, state) -> marker dict``. A pool (:class:`~kscale.executors.local.LocalExecutor`,
:class:`~kscale.executors.ray.RayExecutor`) only decides where shards run; it reports each outcome to
:meth:`ShardPool.done` / :meth:`ShardPool.failed`, and this class decides: a failed shard is retried
until it has had ``resources.max_retries + 1`` attempts, then quarantined with its last error.
"""

from __future__ import annotations

from kscale.executors.progress import Progress


class ShardPool:
    """Base of the executors: ``run(spec, shards, skipped, progress_dir)`` -> the final progress snapshot."""

    def __init__(self, stage_module: str, show_bar: bool = True):
        self.stage_module = stage_module
        self.show_bar = show_bar
        self.progress: Progress | None = None
        self.attempts: dict[str, int] = {}
        self.max_attempts = 1

    def run(self, spec, shards: list, skipped: int, progress_dir: str) -> dict:
        self.progress = Progress(progress_dir, spec.name, spec.kind, len(shards) + skipped, skipped, self.show_bar)
        self.attempts = {}
        self.max_attempts = spec.resources.max_retries + 1
        if shards:
            self.run_shards(spec, shards)
        return self.progress.finish()

    def run_shards(self, spec, shards: list) -> None:
        """Run every shard (calling :meth:`done` / :meth:`failed` for each outcome)."""
        raise NotImplementedError

    def done(self, marker: dict, node: str | None = None) -> None:
        """Shard committed (``marker`` is on disk), on Ray node ``node`` when the pool knows it."""
        assert self.progress is not None
        self.progress.shard_done(marker, node)

    def failed(self, name: str, error: str) -> bool:
        """Record a failed attempt; True when the shard should be tried again, False once quarantined."""
        assert self.progress is not None
        self.attempts[name] = self.attempts.get(name, 0) + 1
        if self.attempts[name] >= self.max_attempts:
            self.progress.shard_failed(name, error, self.attempts[name])
            return False
        self.progress.shard_retry(name, error)
        return True
