"""``run_bias(spec, executor)``: prepare the run directory, plan shards, skip committed ones, run the rest,
then gather the per-sample table, aggregate it with intervals, draw the pictures and write the report.

Run directory (``output.path``)::

    bias.json                 format marker: spec, its fingerprint, the variants
    shards/<variant>.sNNNNNN.parquet   per-sample rows of one (variant, data shard)
    shards/<variant>.sNNNNNN.done.json commit marker, written last (stats, per-sample errors)
    _progress.json            live progress (kscale status)
    samples.parquet / .csv    every committed row
    aggregate.parquet / .csv  one row per (variant, task, metric): value, ci_low, ci_high, n
    dependency.png  dropping.png  checkpoints.png  report.html

The run directory is claimed (:mod:`kscale.output`: exclusive lock, then the policy) for the whole run.
Policy (``output.if_exists``), as for extraction: ``resume`` continues a run of
the same spec (same fingerprint, else an error), ``fail`` refuses an existing run, ``overwrite``
replaces it; a directory that is not a bias run (no ``bias.json`` of format ``kscale-bias``) is never
written into or deleted. A committed shard is skipped only if its variant's weights
are unchanged (``variant_fingerprint`` in the marker).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd

from kscale.bias.plan import BiasShard, marker_path, plan, table_path
from kscale.bias.variants import Variant, enumerate_variants
from kscale.data import open_source
from kscale.output import OutputError, OutputKind, claim_output, read_json, write_json_atomic
from kscale.results import BiasResult
from kscale.spec import JobSpec, to_dict
from kscale.spec.cluster import redact_env

RUN_FORMAT = "kscale-bias"
RUN_FILE = "bias.json"


RunExistsError = OutputError  # the run policy's refusals (kscale.output: foreign, exists, locked)


def bias_marker(path: Path) -> dict | None:
    """``bias.json`` of a kscale bias run (its kind marker), None for anything else."""
    found = read_json(path / RUN_FILE)
    return found if found and found.get("format") == RUN_FORMAT else None


BIAS_KIND = OutputKind("bias run", bias_marker)


@contextmanager
def claim_run_dir(spec, variants: list[Variant]) -> Iterator[Path]:
    """Lock the run directory, then create, check or overwrite it per ``output.if_exists``."""
    from kscale.data.identity import data_identity

    data = data_identity(spec.data)  # checked on resume: a changed dataset is refused (DataChanged)
    meta = {"format": RUN_FORMAT, "spec": redact_env(to_dict(spec)), "spec_fingerprint": spec.fingerprint(),
            "variants": [v.__dict__ for v in variants], "data": data}

    def create(tmp: Path) -> None:
        (tmp / "shards").mkdir()
        write_json_atomic(tmp / RUN_FILE, meta)

    with claim_output(spec.output.path, spec.output.if_exists, BIAS_KIND, spec.fingerprint(), create,
                      data=data, spec=meta["spec"]) as path:
        write_json_atomic(path / RUN_FILE, meta)
        yield path


def is_committed(run_dir: Path, shard: BiasShard) -> bool:
    m = marker_path(run_dir, shard)
    if not m.is_file() or not table_path(run_dir, shard).is_file():
        return False
    return json.loads(m.read_text()).get("variant_fingerprint") == shard.variant.fingerprint


WORKER_MODULE = "kscale.bias.worker"  # the unit of work the shard pool runs


def stage_entry(spec: JobSpec, ctx) -> BiasResult:
    """The stage table's entry (``kscale.spec.STAGES``)."""
    with ctx.maybe_ray(spec):
        return run_bias(spec, ctx.executor(spec, WORKER_MODULE))


def run_bias(spec: JobSpec, executor) -> BiasResult:
    """Score every uncommitted (variant, shard) through ``executor``, then write tables, pictures, report."""
    variants = enumerate_variants(spec.bias)
    from kscale.data.lineindex import index_dir

    n = len(open_source(spec.data, index_dir(spec.output.path), plan=True))  # builds the data indexes once
    shards = plan(variants, n, spec.data.shard_size)
    with claim_run_dir(spec, variants) as run_dir:
        todo = [s for s in shards if not is_committed(run_dir, s)]
        result = executor.run(spec, todo, skipped=len(shards) - len(todo), progress_dir=str(run_dir))
        outputs = finalize(spec, run_dir, [s for s in shards if is_committed(run_dir, s)])
    return BiasResult(run_dir=str(run_dir), variants=[v.name for v in variants], **outputs,
                      **BiasResult.progress_fields({**result, "shards_total": len(shards)}))


def collect(run_dir: Path, shards: list[BiasShard]) -> pd.DataFrame:
    frames = [pd.read_parquet(table_path(run_dir, s)) for s in shards]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def finalize(spec: JobSpec, run_dir: Path, committed: list[BiasShard]) -> dict:
    """samples.*, aggregate.*, pictures and report.html from the committed shards."""
    from kscale.bias.aggregate import aggregate
    from kscale.bias.report import build_report, write_pictures

    samples = collect(run_dir, committed)
    if samples.empty:
        return {"samples_table": None}
    samples = samples.sort_values(["variant", "sample_id"], kind="stable").reset_index(drop=True)
    samples.to_parquet(run_dir / "samples.parquet", index=False)
    samples.to_csv(run_dir / "samples.csv", index=False)
    agg = aggregate(samples, spec.bias)
    agg.to_parquet(run_dir / "aggregate.parquet", index=False)
    agg.to_csv(run_dir / "aggregate.csv", index=False)
    write_pictures(agg, run_dir)
    report = build_report(run_dir)
    return {"samples_table": str(run_dir / "samples.parquet"), "aggregate_table": str(run_dir / "aggregate.parquet"),
            "report": str(report)}
