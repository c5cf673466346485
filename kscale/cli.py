"""The front door: ``kscale submit job.yaml`` and friends. Thin: parse, load the spec, dispatch.

Knobs live in the spec; flags only say *where* to run (``--target``, ``--address``).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, nullcontext

import click

from kscale.errors import KscaleError
from kscale.models.facts import FAMILIES
from kscale.results import StageResult
from kscale.spec import STAGES, SpecError, load_spec


@contextmanager
def _store_locked(store: str, command: str):
    """The store's lock (kscale.output.OutputLock) around a command that rewrites the store's index or
    markers; exit 2 with the holder named when a run holds it."""
    from kscale.output import OutputLock, OutputLocked

    lock = OutputLock(os.path.abspath(store))
    try:
        lock.acquire()
    except OutputLocked as e:
        click.echo(f"kscale {command}: {e}", err=True)
        sys.exit(2)
    try:
        yield
    finally:
        lock.release()


def _load(path: str, overrides: tuple[str, ...] = ()):
    try:
        return load_spec(path, overrides=overrides)
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="kscale")
def main() -> None:
    """kscale: the key-space modality gap of multimodal LLMs, measured and closed at cluster scale."""
    _unblock_stop_signals()


def _unblock_stop_signals() -> None:
    """Ctrl-C (SIGINT) and ``kscale stop`` (SIGTERM) must reach a run. A process inherits its blocked-signal
    mask from the thread that started it; started from a thread that blocks them (seen once in the full test
    suite), ``kscale submit`` ran to the end with SIGINT pending (``test_sigint_stops_cleanly_and_noop_rerun_
    keeps_progress`` now starts it so). An inherited *ignored* SIGINT (a shell's background job) is left as is."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def print_summary(result: StageResult) -> None:
    """The stage's one-line summary on stdout, its notes (quarantined shards) on stderr."""
    click.echo(result.summary_line())
    for line in result.notes():
        click.echo(line, err=True)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--target", type=click.Choice(["local", "ray", "slurm", "k8s"]), default=None,
              help="Where to run: local (this machine; embedded Ray if the spec uses ray), ray (the cluster at "
                   "--address / RAY_ADDRESS via the Jobs API), slurm (sbatch) or k8s (KubeRay).")
@click.option("--address", default=None, help="Ray Jobs API address of a running cluster (http://HEAD:8265).")
@click.option("--dry-run", is_flag=True, help="Print what would be submitted (slurm/k8s) and stop.")
@click.option("--force", is_flag=True, help="Submit a new run even if the same job was submitted before.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a spec field (repeatable), e.g. --set data.n_samples=8 --set extract.layers=[0,2]; "
                   "values are YAML, validated like the file, and recorded with the run.")
def submit(job: str, target: str | None, address: str | None, dry_run: bool, force: bool, no_progress: bool,
           overrides: tuple[str, ...]) -> None:
    """Run JOB (a YAML spec) here or on a cluster. Local runs are recorded like cluster runs: see
    `kscale list`, `status`, `logs -f` and `stop`; Ctrl-C or `kscale stop` stops cleanly, a rerun resumes."""
    spec = _load(job, overrides)
    env_address = os.environ.get("RAY_ADDRESS") or None
    # An http(s) address is a Jobs API endpoint to submit to; any other RAY_ADDRESS (set by Ray inside a
    # cluster job, or "auto") means: run the driver here and join that cluster.
    if address is None and target is None and env_address and env_address.startswith(("http://", "https://")):
        address = env_address
    if target in ("slurm", "k8s", "ray") or address:
        from kscale.cli_cluster import submit_remote, with_overrides

        sys.exit(submit_remote(with_overrides(job, overrides), spec, target or "ray", address, dry_run, force))
    from kscale.runner import run_job

    sched = os.environ.get("KSCALE_DASK_SCHEDULER_FILE")
    use_sched = STAGES[spec.kind].use_scheduler_file
    if sched and use_sched:  # set by kscale's Slurm script: use the allocation's dask cluster
        spec = use_sched(spec, sched)
    from kscale.targets.local import LocalRun

    in_cluster_driver = bool(os.environ.get("KSCALE_SUBMISSION_ID"))  # the cluster wrapper keeps the records
    record = LocalRun(spec, job, overrides) if not in_cluster_driver else None
    if record is None:  # a cluster's driver: scancel / `kscale stop` (SIGTERM) stop it cleanly too
        import signal

        from kscale.targets.local import term_as_interrupt

        signal.signal(signal.SIGTERM, term_as_interrupt)
    try:
        with (record if record is not None else _nullcontext()):
            try:
                result = run_job(spec, address=env_address, show_bar=not no_progress)
            except KscaleError as e:  # a refused input: foreign or locked output, changed data, a missing store...
                click.echo(f"kscale submit: {type(e).__name__}: {e}", err=True)
                if record is not None:
                    record.finish(2, message=str(e))
                sys.exit(2)
            print_summary(result)
            code = 1 if result.failed else 0
            if record is not None:
                record.finish(code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


def _nullcontext():
    from contextlib import nullcontext

    return nullcontext()


@main.command("list")
@click.option("-n", "limit", default=20, show_default=True, help="How many runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def list_runs(limit: int, as_json: bool) -> None:
    """Runs recorded on this machine (local and cluster), newest first, with their state."""
    from kscale.targets import records

    rows = records.list_runs(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    if not rows:
        click.echo("kscale: no runs recorded in " + str(records.kscale_home()))
        return
    for r in rows:
        where = r.get("address") or r.get("slurm_job_id") or r.get("namespace") or r.get("host") or ""
        click.echo(f"{r['id']:44s} {r['target']:6s} {str(r.get('state') or '?'):10s} {str(where):22s} "
                   f"{r.get('saved_at', '')}  {r.get('output', '')}")


@main.command()
def schema() -> None:
    """Print a JSON Schema of the job spec (for editor completion: yaml-language-server, VS Code)."""
    from kscale.spec_schema import json_schema

    click.echo(json.dumps(json_schema(), indent=1))


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--explain", is_flag=True, help="Also print every field with its type, default and meaning.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field, as in submit.")
def validate(job: str, explain: bool, overrides: tuple[str, ...]) -> None:
    """Check JOB and report every problem with its dotted field."""
    spec = _load(job, overrides)
    click.echo(f"{job}: ok (kind {spec.kind}, fingerprint {spec.fingerprint()})")
    if explain:
        from kscale.spec import explain as rows

        stage = STAGES[spec.kind]
        click.echo(f"kind {spec.kind}: {stage.summary}; writes {stage.output} at output.path; needs "
                   f"{', '.join(stage.needs + ('output',))}; a cluster allocation starts "
                   f"{ {'dask': 'a dask cluster', 'ray': 'a Ray cluster', 'none': 'no service'}[stage.runtime_of(spec)]} first"
                   + (f"; resources.workers: {stage.workers}" if stage.workers else ""))
        click.echo("kinds: " + "; ".join(f"{k} ({s.summary})" for k, s in STAGES.items()))
        for name, tp, default, doc in rows():
            click.echo(f"{name:38s} {tp:28s} {default:14s} {doc}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--reindex", is_flag=True, help="Rebuild the store index from the commit markers first.")
def info(store: str, as_json: bool, reindex: bool) -> None:
    """Summarise a key store: samples, tokens per modality, layers, heads, bytes, errors."""
    from kscale.store.index import load_index, shard_errors, summarize, write_index
    from kscale.store.layout import StoreError, read_root_attrs

    try:
        attrs = read_root_attrs(store)  # from the index alone: neither zarr nor dask is imported
        with _store_locked(store, "info") if reindex else nullcontext():  # never beside a writing run
            index = write_index(store) if reindex else load_index(store)
    except StoreError as e:
        click.echo(f"kscale info: {e}", err=True)
        sys.exit(2)
    summ = summarize(store, attrs, index)
    if as_json:
        click.echo(json.dumps(summ, indent=1))
        return
    for k, v in summ.items():
        click.echo(f"{k:18s} {v}")
    for e in shard_errors(store, index)[:20]:
        click.echo(f"  error sample {e['sample_id']} ({e['source_id']}): {e['reason']}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True, help="Un-commit damaged shards so that a rerun of the extraction redoes them.")
@click.option("--quick", is_flag=True, help="Check files and sizes only, without decoding every chunk.")
@click.option("--workers", default=8, show_default=True, help="Threads checking shards in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def verify(store: str, repair: bool, quick: bool, workers: int, as_json: bool) -> None:
    """Check every committed shard of a key store (files, sizes, checksums); exit 1 if any is damaged."""
    import kscale.store
    from kscale.store import verify as v

    if not kscale.store.is_store(store):
        click.echo(f"kscale verify: {store!r} is not a kscale key store", err=True)
        sys.exit(2)
    unchecked: list[str] = []
    with _store_locked(store, "verify") if repair else nullcontext():  # un-commits only what no run writes
        damage = v.verify_store(store, quick=quick, workers=workers, unchecked=unchecked)
        undone = v.repair(store, damage) if repair and damage else []
    if as_json:
        click.echo(json.dumps({"damaged": v.report(damage), "uncommitted": undone,
                               "without_metadata_checksums": unchecked}, indent=1))
    else:
        if unchecked:
            click.echo(f"note: {len(unchecked)} shard(s) ({', '.join(unchecked[:3])}{', ...' if len(unchecked) > 3 else ''})"
                       " were written before markers recorded metadata checksums: a same-size edit of their "
                       "zarr.json files that still parses and opens is not found")
        for d in damage:
            click.echo(f"damaged {d.line()}")
        n = len({d.shard for d in damage})
        click.echo(f"{store}: {n} damaged shard(s)" + (f"; un-committed {len(undone)}: rerun the extraction to "
                                                        "redo them" if undone else "") if n else f"{store}: ok")
    sys.exit(1 if damage else 0)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to", type=click.Choice(["parquet", "hf"]), required=True,
              help="parquet: Parquet shards and a README card; hf: the same, loadable by datasets.load_dataset(DIR).")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layers", default=None, help="Comma-separated layers to export (default: every stored layer).")
@click.option("--modalities", default=None, help="Comma-separated modalities (default: text,image,video,special).")
def export(store: str, to: str, out_dir: str, layers: str | None, modalities: str | None) -> None:
    """Write STORE's keys and token table to OUT_DIR as Parquet (one file per shard, streamed)."""
    import kscale.store
    from kscale.store.export import export_store

    if not kscale.store.is_store(store):
        click.echo(f"kscale export: {store!r} is not a kscale key store", err=True)
        sys.exit(2)
    try:
        chosen = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        click.echo(f"kscale export: --layers: expected comma-separated layer numbers, got {layers!r}", err=True)
        sys.exit(2)
    try:
        files = export_store(store, out_dir, to, chosen, modalities.split(",") if modalities else None)
    except KscaleError as e:  # a layer or modality the store does not hold
        click.echo(f"kscale export: {type(e).__name__}: {e}", err=True)
        sys.exit(2)
    click.echo(f"{out_dir}: {len(files)} Parquet file(s) and README.md")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir: str) -> None:
    """Rebuild RUN_DIR/report.html from an analysis, bias, eval or train run's tables."""
    from pathlib import Path

    run = Path(run_dir)
    bias_meta = run / "bias.json"
    if bias_meta.is_file() and json.loads(bias_meta.read_text()).get("format") == "kscale-bias":
        from kscale.bias.report import build_report
    elif (run / "results.parquet").is_file():
        from kscale.analysis.report import build_report
    elif (run / "scores.json").is_file():  # an eval run: the referee's table from its scores and mechanism.csv
        from kscale.eval.referee import build_report
    elif (run / "metrics.jsonl").is_file() or (run / "eval.json").is_file():
        from kscale.train.report import build_report
    else:
        click.echo(f"kscale report: {run_dir!r} is neither an analysis run (results.parquet), a bias run "
                   "(bias.json), an eval run (scores.json) nor a train run (metrics.jsonl)", err=True)
        sys.exit(2)
    click.echo(str(build_report(run)))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the families as JSON.")
def models(as_json: bool) -> None:
    """List the model families with what kscale supports for each (keys, queries, attention, video, train,
    bias) and their MaLoRA targets, from the adapters themselves (the README's table is this output)."""
    from kscale.models.registry import families_table, family_rows

    click.echo(json.dumps(family_rows(), indent=1) if as_json else families_table())


@main.command("debug-model")
@click.argument("family", type=click.Choice(FAMILIES))
@click.argument("out_dir", type=click.Path(file_okay=False))
def debug_model(family: str, out_dir: str) -> None:
    """Save a tiny random FAMILY model + tokenizer + image processor to OUT_DIR."""
    from kscale.models.debug import build_debug_model

    click.echo(build_debug_model(family, out_dir))


def _register_optional() -> None:
    """The cluster commands (status, logs, stop, doctor, render), defined in kscale.cli_cluster."""
    try:
        from kscale import cli_cluster
    except ImportError:
        return
    for name in ("status", "logs", "stop", "doctor", "render"):
        cmd = getattr(cli_cluster, name, None)
        if cmd is not None:
            main.add_command(cmd)


_register_optional()

if __name__ == "__main__":
    main()
