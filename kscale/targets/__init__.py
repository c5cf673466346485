"""Cluster targets as objects: where ``kscale submit --target`` sends a job, and how its status, logs and
stop reach it afterwards.

Each target (:class:`~kscale.targets.ray_jobs.RayJobsTarget`, :class:`~kscale.targets.slurm.SlurmTarget`,
:class:`~kscale.targets.k8s.K8sTarget`) answers the same calls, so ``cli_cluster`` and ``doctor``
dispatch on the object instead of comparing names. ``records`` holds what they share: submission ids,
the local registry of submissions, the record dir beside the outputs and the cluster-side driver wrapper;
``config`` the spec's ``cluster`` section; ``checks`` the preflight pieces (``Finding``, versions, ports).
The shard pools that run a stage's shards inside one job are in :mod:`kscale.executors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from kscale.targets.checks import Finding
    from kscale.targets.records import Run

_CLASSES = {"local": "kscale.targets.local:LocalTarget", "ray": "kscale.targets.ray_jobs:RayJobsTarget",
            "slurm": "kscale.targets.slurm:SlurmTarget", "k8s": "kscale.targets.k8s:K8sTarget"}


class Target:
    """One place a job can run. ``status``/``logs``/``stop`` answer None/False when the target cannot say
    (no record of the run on this machine, or the cluster does not know it); callers then fall back on
    the records beside the outputs."""

    name: ClassVar[str] = ""
    errors: ClassVar[tuple[type[Exception], ...]] = ()  # this target's own failures (shown without traceback)

    def submit(self, spec_path: str, spec: Any, address: str | None, dry_run: bool, force: bool,
               say: Callable[[str], None], err: Callable[[str], None]) -> int:
        raise NotImplementedError(f"{self.name}: submit")

    def status(self, run: Run, address: str | None) -> dict | None:
        return None

    def logs(self, run: Run, address: str | None, follow: bool, write: Callable[[str], None],
             err: Callable[[str], None]) -> int | None:
        return None

    def stop(self, run: Run, address: str | None, say: Callable[[str], None]) -> bool:
        return False

    def render(self, spec: Any, spec_path: str, sid: str) -> str:
        raise NotImplementedError(f"{self.name}: render")

    def checks(self, spec: Any | None, spec_path: str | None, address: str | None) -> list[Finding]:
        return []


def get_target(name: str) -> Target:
    """The target object for ``local``, ``ray``, ``slurm`` or ``k8s`` (modules imported on demand)."""
    module, cls = _CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
