"""The eval stage on Ray: ``resources.workers`` actors, one task shard each, running the torchrun ranks' code.

:func:`run_eval_on_ray` is what :func:`kscale.eval.run.stage_entry` calls with ``resources.executor: ray``
(embedded Ray, a Ray cluster, a Slurm allocation or a KubeRay RayJob: the runner has connected Ray). The
driver claims the run directory (lock, ``output.if_exists``: a rerun resumes), then
:func:`kscale.executors.ray_group.run_ranks` starts the actors as the ranks of one process group and each
calls :func:`kscale.eval.run.run_eval` -- what every ``torchrun -m kscale.eval`` rank calls: lmms-eval's
``rank::world_size`` split of each task's documents, the gather on rank 0, which writes ``runs/*.json`` after
each variant and the tables at the end. The driver returns rank 0's :class:`~kscale.results.EvalResult`
(the runner writes ``result.json`` as for a one-process run). ``output.path`` must be on storage the rank-0
actor's node sees.

A rank that dies or raises stops the group; :class:`EvalRankFailed` names it and what was being evaluated,
read from the run files on disk (rank 0 writes a variant's files only once the variant is done, in
``eval.variants`` order): the first variant whose files are missing. A rerun of the same job
(``output.if_exists: resume``) skips the variants whose files exist.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kscale.errors import KscaleError
from kscale.results import EvalResult
from kscale.spec import JobSpec

RANK_ENTRY = "kscale.eval.run:run_eval"


class EvalRankFailed(KscaleError):
    """A rank of the eval process group died or raised (the CLI prints it without a traceback, exit status 2;
    the rank's own traceback is in the Ray worker's log, forwarded to the driver's stderr)."""


def absolute_variant_paths(spec: JobSpec) -> JobSpec:
    """Adapter and run paths of ``eval.variants`` that exist relative to this process's directory, made
    absolute: ranks may run elsewhere (a Ray worker's working directory is not the driver's). Anything else
    (an absolute path, a hub id of a PEFT adapter) is left as written."""

    def fix(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        if q.is_absolute():
            return str(q)
        return str(q.resolve()) if q.exists() else p

    variants = [dataclasses.replace(v, path=fix(v.path), analysis_run=fix(v.analysis_run), bias_run=fix(v.bias_run))
                for v in spec.eval.variants]
    return dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, variants=variants))


def in_progress(spec: JobSpec, run_dir: Path) -> str:
    """What rank 0 was on, from the run files written so far (see the module docstring)."""
    from kscale.eval.run import run_file

    conditions = [False, True] if spec.eval.blind else [False]
    tasks = ", ".join(spec.eval.tasks)
    for v in spec.eval.variants:
        missing = [b for b in conditions if not run_file(run_dir, v.name, b).is_file()]
        if missing:
            what = " and ".join("blind" if b else "with the image" for b in missing)
            return f"variant {v.name!r} ({what}) on tasks {tasks}"
    return "the run's tables (every variant's runs/*.json is written)"


def run_eval_on_ray(spec: JobSpec) -> EvalResult:
    """The eval stage on the connected Ray cluster (see the module docstring)."""
    from kscale.eval.run import claim
    from kscale.executors.ray_group import RankFailed, run_ranks

    with claim(spec) as run_dir:
        try:
            return run_ranks(spec, RANK_ENTRY, {"output_claimed": True})
        except RankFailed as e:
            done = sorted(p.name for p in (Path(run_dir) / "runs").glob("*.json"))
            raise EvalRankFailed(
                f"eval {spec.name!r} stopped while evaluating {in_progress(spec, run_dir)}: {e}. Kept in "
                f"{run_dir}/runs: {', '.join(done) or 'nothing yet'}; rerun the same job (output.if_exists: resume) "
                f"to evaluate only what is missing") from None
