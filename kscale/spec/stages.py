"""Stages as a table: one entry per job kind, read by everything that used to ask ``spec.kind == ...``.

An entry says what a kind's job needs (its own options section, the other sections it requires, the
fields that hold paths), what runs it (``entry``: a ``module:function`` the runner imports and calls as
``f(spec, ctx)``, ``ctx`` being :class:`kscale.runner.RunContext`), what it writes, and what it needs of a
cluster (``runtime``: the services a Slurm or Kubernetes allocation starts before the driver, the CPUs
per node). The spec loader (:func:`kscale.spec.spec_from_dict`), the runner, the Slurm and Kubernetes
renders and ``kscale validate --explain`` read it; a new stage is a new entry here and its entry function.

The table itself is built in :mod:`kscale.spec` (``STAGES``), next to the section classes it names; this
module only defines the entry type, so it imports nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Stage:
    kind: str  # the job's `kind:`
    section: type  # the kind's own options section (`extract:`, `analyze:`, ...), built with defaults if absent
    needs: tuple[str, ...]  # other sections a job of this kind must have (besides `output`)
    entry: str  # "module:function" run as function(spec, ctx) -> StageResult
    summary: str  # one line: what the stage does (`kscale validate --explain`, `kscale stages`)
    output: str  # what `output.path` becomes
    # What a cluster allocation starts before the driver: "dask" (a scheduler and workers), or "executor"
    # (a Ray cluster when resources.executor is ray, nothing for the local executor).
    runtime: Literal["dask", "executor"] = "executor"
    path_fields: tuple[str, ...] = ()  # fields of the section holding paths (str or list), made absolute
    final_progress: bool = False  # no shard pool: the runner leaves the final summary in _progress.json
    cluster_cpus: Callable[[Any], int] | None = None  # CPUs per node it needs (None: from `resources`)
    use_scheduler_file: Callable[[Any, str], Any] | None = None  # the spec, set to join a dask scheduler file
    workers: str | None = None  # what resources.workers are for this kind, when not a pool of shard actors

    def runtime_of(self, spec: Any) -> Literal["dask", "ray", "none"]:
        """What a cluster allocation of ``spec`` starts before the driver."""
        if self.runtime == "dask":
            return "dask"
        return "ray" if spec.resources.executor == "ray" else "none"
