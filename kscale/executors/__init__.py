"""Executors decide where and when a stage's shards run; the work itself is a plain function.

A stage is a module with ``setup(spec) -> state`` (once per worker, e.g. load the model) and
``run_shard(spec, shard, state) -> marker dict``. ``LocalExecutor`` runs it in this process;
``RayExecutor`` runs a pool of named Ray actors with dynamic hand-out, retries and quarantine.
Both derive from ``executors.base.ShardPool`` (retries, quarantine) and report through ``Progress`` (terminal bar + ``_progress.json`` beside the outputs).
``ray_group.run_ranks`` is not a shard pool: it starts ``resources.workers`` Ray actors as the ranks of one
torch.distributed process group, as torchrun would, for work that splits itself across ranks (the eval stage).
"""
