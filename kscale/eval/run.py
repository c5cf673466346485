"""The eval stage's entry (``kscale.spec.STAGES["eval"]``): every variant through lmms-eval, with and without
the image, into one run directory.

Run directory (``output.path``)::

    kscale.json                    the run marker (kind eval, spec fingerprint)
    runs/<variant>.json            lmms-eval's results of the variant (results, n-samples, configs, versions)
    runs/<variant>.blind.json      the same with every image removed (eval.blind)
    scores.csv, scores.json        one row per (variant, task, metric): kscale.eval.table.score_rows
    samples.csv                    per-document metrics of every run: kscale.eval.table.sample_rows
    mechanism.csv, report.html     the referee's table: scores beside the mechanism runs named per variant
                                   (analysis_run, bias_run), deltas from base: kscale.eval.referee
    result.json                    the EvalResult

Each variant loads the model afresh (:func:`kscale.eval.variants.load_variant`); the image and blind runs
share it (the blind run is the same :class:`~kscale.eval.lmms_model.KscaleLMM` with ``blind=True``). A run
whose ``runs/*.json`` exists is not repeated on ``output.if_exists: resume`` (same spec only: the marker's
fingerprint is checked). One process (``resources.executor: local``), or one task shard per worker: N ranks
of one process group, each running :func:`run_eval`, started by ``torchrun --nproc_per_node N -m kscale.eval
job.yaml`` or, with ``resources.executor: ray``, as ``resources.workers`` Ray actors
(:mod:`kscale.eval.launch`); lmms-eval gives rank r every N-th document from r of each task and gathers the
per-document results on rank 0, which alone writes the run directory (``runs/*.json`` then record
``kscale_shards``: the (task, doc_id) each rank answered, and ``kscale_workers``: each rank's PID and host).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kscale.output import (RUN_MARKER, OutputError, OutputKind, claim_output, run_marker, run_marker_reader,
                           write_json_atomic)
from kscale.results import EvalResult
from kscale.spec import JobSpec

EVAL_KIND = OutputKind("eval run", run_marker_reader("eval"))
RUNS = "runs"


def stage_entry(spec: JobSpec, ctx) -> EvalResult:
    """The stage table's entry (``kscale.spec.STAGES``): with the Ray executor, ``resources.workers`` Ray
    actors run :func:`run_eval` as the ranks of one process group (:mod:`kscale.eval.launch`); otherwise it
    runs in this process."""
    from kscale.eval.launch import absolute_variant_paths, run_eval_on_ray

    spec = absolute_variant_paths(spec)
    if spec.resources.executor == "ray":
        with ctx.ray(spec):
            return run_eval_on_ray(spec)
    return run_eval(spec)


def run_file(run_dir: Path, variant: str, blind: bool) -> Path:
    return run_dir / RUNS / f"{variant}{'.blind' if blind else ''}.json"


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    """The parts of lmms-eval's results worth keeping, as JSON (per-document samples go to samples.csv)."""
    keep = {k: results[k] for k in ("results", "n-samples", "configs", "versions", "higher_is_better", "kscale_shards",
                                    "kscale_workers") if k in results}
    return json.loads(json.dumps(keep, default=str))


def process_group(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size) of the launcher's process group (``torchrun --nproc_per_node N -m kscale.eval`` and
    :func:`kscale.executors.ray_group.run_ranks` set WORLD_SIZE, RANK, LOCAL_RANK and MASTER_*), joined over
    gloo, or NCCL when the model goes to a GPU (``device``: ``model.device``; lmms-eval gathers tensors on the
    model's device), each rank on GPU ``LOCAL_RANK``; (0, 1) for a lone process."""
    import os

    import torch
    import torch.distributed as dist

    from kscale.models.registry import pick_device

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    gpu = pick_device(device).type == "cuda"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (what to run next, or why the run was refused)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_eval(spec: JobSpec, output_claimed: bool = False) -> EvalResult:
    """Every variant through lmms-eval (see the module docstring). In a process group of N ranks each rank
    answers its shard of every task's documents (lmms-eval's ``rank::world_size`` split) and rank 0, which
    alone claims and writes the run directory, gets the merged results; ranks > 0 return no rows.
    ``output_claimed``: the caller (the Ray driver, :mod:`kscale.eval.launch`) holds the run directory's claim
    already (lock and ``output.if_exists`` applied), so rank 0 writes into it as it is."""
    rank, world = process_group(spec.model.device)
    if rank != 0:
        return _follow(spec, world)
    t0 = time.time()
    with ExitStack() as stack:
        try:
            run_dir = Path(spec.output.path) if output_claimed else stack.enter_context(claim(spec))
        except OutputError as e:
            _from_rank0(str(e), world)
            raise
        _from_rank0(None, world)
        rows = _evaluate_all(spec, run_dir, world)
    return EvalResult(run_dir=str(run_dir), variants=[v.name for v in spec.eval.variants], tasks=list(spec.eval.tasks),
                      rows=rows, table=str(Path(run_dir) / "scores.csv"), seconds=round(time.time() - t0, 1))


def claim(spec: JobSpec):
    """The run directory, locked and with ``output.if_exists`` applied (a context manager)."""

    def create(tmp: Path) -> None:
        (tmp / RUNS).mkdir()
        write_json_atomic(tmp / RUN_MARKER, run_marker("eval", spec.fingerprint()))

    return claim_output(spec.output.path, spec.output.if_exists, EVAL_KIND, spec.fingerprint(), create)


def _follow(spec: JobSpec, world: int) -> EvalResult:
    """A rank > 0: answer this rank's shard of each run rank 0 asks for."""
    refused = _from_rank0(None, world)
    if refused is not None:
        raise OutputError(refused)
    for variant in spec.eval.variants:
        todo = _from_rank0(None, world)
        if todo:
            evaluate_variant(spec, variant, todo, world)
    return EvalResult(run_dir=str(spec.output.path), variants=[v.name for v in spec.eval.variants],
                      tasks=list(spec.eval.tasks), rows=[], table=None)


def _evaluate_all(spec: JobSpec, run_dir: Path, world: int) -> list[dict[str, Any]]:
    import pandas as pd

    from kscale.eval.table import sample_rows, score_rows

    cfg = spec.eval
    runs: dict[tuple[str, bool], dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    conditions = [False, True] if cfg.blind else [False]
    for variant in cfg.variants:
        todo = _from_rank0([b for b in conditions if not run_file(run_dir, variant.name, b).is_file()], world)
        if todo:
            done = evaluate_variant(spec, variant, todo, world)
            for blind, results in done.items():
                samples += sample_rows(variant.name, blind, results)
                write_json_atomic(run_file(run_dir, variant.name, blind), _jsonable(results))
        for blind in conditions:
            runs[(variant.name, blind)] = json.loads(run_file(run_dir, variant.name, blind).read_text())
    rows = score_rows(runs)
    pd.DataFrame(rows).to_csv(run_dir / "scores.csv", index=False)
    write_json_atomic(run_dir / "scores.json", rows)
    if samples:
        old = run_dir / "samples.csv"
        frame = pd.DataFrame(samples)
        if old.is_file():  # a resumed run: keep the rows of the runs done before
            prev = pd.read_csv(old)
            frame = pd.concat([prev[~prev.set_index(["variant", "blind"]).index.isin(
                frame.set_index(["variant", "blind"]).index)], frame], ignore_index=True)
        frame.to_csv(old, index=False)
    from kscale.eval.referee import build_report

    build_report(run_dir, list(cfg.variants))
    return rows


def evaluate_variant(spec: JobSpec, variant, conditions: list[bool], world: int = 1) -> dict[bool, dict[str, Any]]:
    """lmms-eval's results of one variant, with the image (False) and/or blind (True); on rank 0 of N > 1
    ranks they carry ``kscale_shards``: the documents each rank answered (ranks > 0 get None results)."""
    from kscale.eval.harness import evaluate
    from kscale.eval.lmms_model import KscaleLMM
    from kscale.eval.variants import load_variant

    cfg = spec.eval
    loaded = load_variant(spec.model, variant)
    out = {}
    for blind in conditions:
        model = KscaleLMM(loaded, batch_size=cfg.batch_size, blind=blind, max_new_tokens=cfg.max_new_tokens)
        out[blind] = evaluate(model, cfg.tasks, cfg.include_path, cfg.limit, cfg.batch_size, cfg.bootstrap_iters,
                              cfg.seed)
        if world > 1:
            import os
            import socket

            import torch.distributed as dist

            shards: list[Any] = [None] * world
            dist.all_gather_object(shards, (os.getpid(), socket.gethostname(), sorted(model.seen)))
            if out[blind] is not None:
                out[blind]["kscale_shards"] = [[list(d) for d in seen] for _, _, seen in shards]
                out[blind]["kscale_workers"] = [{"rank": r, "pid": pid, "host": host}
                                                for r, (pid, host, _) in enumerate(shards)]
    return out
