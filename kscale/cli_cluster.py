"""Cluster commands: ``kscale status``, ``logs``, ``stop``, ``doctor``, ``render`` and the remote half of
``kscale submit`` (``submit_remote``), registered on the main click group by ``kscale/cli.py``.

A *run* on the command line is any of: a submission id (``kscale-demo-1a2b3c4d5e``), the job YAML (its
id is derived again), or a run directory (the output path, or its ``.cluster`` record dir). Submissions
made from this machine are found in ``$KSCALE_HOME/submissions`` and know their target; the output's
``_progress.json`` and the record dir answer even when the cluster is gone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kscale.errors import KscaleError
from kscale.spec import SpecError, load_spec
from kscale.targets import Target, get_target
from kscale.targets import records
from kscale.targets.records import Run, format_progress, latest_state, read_json, read_progress, record_dir


def _say(text: str) -> None:
    click.echo(text)


def _err(text: str) -> None:
    click.echo(text, err=True)


def with_overrides(spec_path: str, overrides: tuple[str, ...]) -> str:
    """The job YAML to ship to a cluster: ``spec_path`` itself, or (with ``--set``) the YAML with the
    overrides applied, kept in ``$KSCALE_HOME/specs/`` so the cluster runs exactly what was validated."""
    if not overrides:
        return spec_path
    import hashlib

    import yaml

    from kscale.spec import apply_overrides

    raw, _ = apply_overrides(yaml.safe_load(Path(spec_path).read_text()), overrides)  # validated by load_spec
    # cluster.env values stay out (they travel in the loaded spec to the target, which writes them to the
    # run's 0600 env file or a Kubernetes Secret); the header is one comment line whatever the file name.
    text = yaml.safe_dump(records.redact_env(raw), sort_keys=False)
    out = records.kscale_home() / "specs" / f"{Path(spec_path).stem}-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = " --set ".join(records.redact_overrides(overrides))
    out.write_text(f"# {json.dumps(spec_path)} with --set {json.dumps(shown)}\n" + text)
    return str(out)


def submit_remote(spec_path: str, spec: Any, target: str, address: str | None, dry_run: bool, force: bool) -> int:
    """``kscale submit`` for ``--target slurm|k8s`` or a Ray Jobs API address; prints, returns the exit code."""
    t = get_target(target)
    try:
        return t.submit(spec_path, spec, address, dry_run, force, _say, _err)
    except SpecError as e:
        _err(str(e))
        return 2
    except t.errors as e:
        _err(f"kscale submit: {e}")
        return 2
    except KscaleError as e:  # an unsafe record dir (kscale.private.UnsafePath), ...
        _err(f"kscale submit: {type(e).__name__}: {e}")
        return 2


# ----------------------------------------------------------------------------- resolving a RUN argument


def resolve_run(arg: str | None) -> Run:
    """Turn a submission id, job YAML or run directory into what we know about that run."""
    if arg is None:
        recent = records.list_submissions(1)
        if not recent:
            raise click.UsageError("no RUN given and no runs recorded on this machine")
        arg = recent[0]["id"]
    p = Path(arg)
    if p.is_dir():
        out = str(p.absolute())
        if out.endswith(".cluster"):
            return Run(_sid_in(p), None, out[: -len(".cluster")], p.absolute())
        rec = Path(out + ".cluster")
        sid = _sid_in(rec)
        return Run(sid, records.load_submission(sid) if sid else None, out, rec)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        try:
            spec = load_spec(p, check_model=False)
        except SpecError as e:
            raise click.UsageError(str(e)) from e
        sid = records.submission_id(spec)
        record = records.load_submission(sid)
        out = (record or {}).get("output") or str(Path(spec.output.path).expanduser().absolute())
        return Run(sid, record, out, Path(record["record_dir"]) if record and record.get("record_dir")
                   else record_dir(spec, out))
    record = records.load_submission(arg)
    rec = Path(record["record_dir"]) if record and record.get("record_dir") else None
    return Run(arg, record, (record or {}).get("output"), rec)


def _sid_in(rec: Path) -> str | None:
    st = latest_state(rec)
    if st:
        return st.get("submission_id")
    scripts = sorted(rec.glob("*.job.yaml"), key=lambda f: f.stat().st_mtime) if rec.is_dir() else []
    return scripts[-1].name[: -len(".job.yaml")] if scripts else None


def _target(run: Run, address: str | None) -> Target | None:
    """The target that knows the run: a Ray cluster when ``--address`` is given, else the one recorded."""
    name = "ray" if address else (run.record or {}).get("target")
    return get_target(name) if name else None


# ----------------------------------------------------------------------------- status


@click.command()
@click.argument("run", required=False)
@click.option("--address", default=None, help="Ray Jobs API address (default: the one recorded at submit).")
@click.option("--json", "as_json", is_flag=True, help="Print everything known as JSON.")
def status(run: str | None, address: str | None, as_json: bool) -> None:
    """State and progress of RUN (submission id, job YAML or run directory); no RUN: recent submissions."""
    if run is None and not as_json:
        subs = records.list_runs()
        if not subs:
            _say("kscale: no runs recorded on this machine")
            return
        for s in subs:
            where = s.get("address") or s.get("slurm_job_id") or s.get("namespace") or s.get("host") or ""
            _say(f"{s['id']:44s} {s['target']:6s} {str(s.get('state') or '?'):10s} {str(where):22s} "
                 f"{s.get('saved_at', '')}  {s.get('output', '')}")
        return
    r = resolve_run(run)
    t = _target(r, address)
    info: dict[str, Any] = {"submission_id": r.sid, "target": t.name if t else None, "output": r.output}
    info["cluster"] = _cluster_state(t, r, address)
    if r.rec_dir is not None:
        info["driver"] = (read_json(r.rec_dir / f"{r.sid}.state.json") if r.sid else None) or latest_state(r.rec_dir)
    if r.output:
        info["progress"] = read_progress(r.output)
    if as_json:
        _say(json.dumps(info, indent=1, default=str))
    else:
        _print_status(info)
    if not any(info.get(k) for k in ("cluster", "driver", "progress")):
        sys.exit(1)


def _cluster_state(t: Target | None, r: Run, address: str | None) -> dict | None:
    """What the cluster itself says, or None when it cannot be asked (gone, unreachable, unknown)."""
    if t is None:
        return None
    try:
        return t.status(r, address)
    except (*t.errors, OSError, RuntimeError) as e:
        return {"status": "UNREACHABLE", "message": str(e).splitlines()[0]}


def _print_status(info: dict) -> None:
    _say(f"run       {info.get('submission_id') or '?'}  (target {info.get('target') or 'unknown'})")
    c = info.get("cluster")
    if c:
        extra = "".join(f", {k} {v}" for k, v in c.items() if k != "status" and v)
        _say(f"{'cluster' if info.get('target') != 'local' else 'local':9s} {c.get('status')}{extra}")
    d = info.get("driver")
    if d:
        _say(f"driver    {d.get('state')} on {d.get('host')} since {d.get('started_at')}"
             + (f", exit code {d['exit_code']} at {d.get('ended_at')}" if "exit_code" in d else ""))
    p = info.get("progress")
    _say(f"progress  {format_progress(p)}" if p else f"progress  none yet at {info.get('output')}/_progress.json")


# ----------------------------------------------------------------------------- logs


@click.command()
@click.argument("run", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends (reconnects if needed).")
@click.option("--address", default=None, help="Ray Jobs API address (default: the one recorded at submit).")
def logs(run: str | None, follow: bool, address: str | None) -> None:
    """The driver's log of RUN (it includes worker output); from the cluster, or the run's records."""
    r = resolve_run(run)
    t = _target(r, address)
    write = lambda s: click.echo(s, nl=False)  # noqa: E731
    if t is not None:
        try:
            code = t.logs(r, address, follow, write, _err)
            if code is not None:
                sys.exit(code)
        except t.errors as e:
            _err(f"kscale logs: {e}; showing the log kept beside the outputs instead")
    log = r.rec_dir / f"{r.sid}.driver.log" if r.rec_dir and r.sid else None
    if log is None or not log.is_file():
        raise click.ClickException(f"no log for {run or r.sid}: the cluster does not know it and "
                                   f"{log or 'no record dir'} does not exist")
    write(log.read_text(errors="replace"))


# ----------------------------------------------------------------------------- stop


@click.command()
@click.argument("run", required=False)
@click.option("--address", default=None, help="Ray Jobs API address (default: the one recorded at submit).")
def stop(run: str | None, address: str | None) -> None:
    """Stop RUN: the Ray job, the Slurm job (its driver first, through a stop file; a second stop cancels the job)
    or the RayJob. Committed shards stay."""
    r = resolve_run(run)
    t = _target(r, address)
    if t is not None:
        try:
            if t.stop(r, address, _say):
                return
        except t.errors as e:
            raise click.ClickException(str(e)) from e
    raise click.ClickException(f"don't know where {run or r.sid} runs: give --address for a Ray cluster, or "
                               "stop it from the machine that submitted it")


# ----------------------------------------------------------------------------- render / doctor


@click.command()
@click.argument("job", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", type=click.Choice(["slurm", "k8s", "raycluster"]), required=True)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None, help="Write here.")
def render(job: str, target: str, out: str | None) -> None:
    """Print the sbatch script, RayJob or RayCluster kscale would submit for JOB (for hand use)."""
    try:
        spec = load_spec(job, check_model=False)
        if target == "raycluster":  # a standalone cluster for hand use: no submission id
            from kscale.targets.k8s import K8sTarget

            text = K8sTarget().render_cluster(spec)
        else:
            text = get_target(target).render(spec, job, records.submission_id(spec))
    except SpecError as e:
        raise click.ClickException(str(e)) from e
    if out:
        Path(out).write_text(text)
        _say(f"kscale: wrote {out}")
    else:
        click.echo(text, nl=False)


@click.command()
@click.argument("job", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--target", type=click.Choice(["local", "ray", "slurm", "k8s"]), default=None,
              help="Also check what this target needs (default: local, or ray with --address).")
@click.option("--address", default=None, help="Check a running Ray cluster through its Jobs API.")
@click.option("--json", "as_json", is_flag=True, help="Findings as JSON.")
def doctor(job: str | None, target: str | None, address: str | None, as_json: bool) -> None:
    """Preflight: GPUs per node and per actor, versions, disk and write access, ports, auth; each with a fix."""
    from kscale import doctor as doc

    spec = None
    if job:
        try:
            spec = load_spec(job, check_model=False)
        except SpecError as e:
            raise click.ClickException(str(e)) from e
    findings = doc.run_checks(spec, target or ("ray" if address else "local"), address, job)
    if as_json:
        _say(json.dumps([f.as_dict() for f in findings], indent=1))
    else:
        for f in findings:
            _say(f.line())
        bad = sum(f.level == "fail" for f in findings)
        _say(f"kscale doctor: {len(findings)} checks, {bad} failed, {sum(f.level == 'warn' for f in findings)} warnings")
    sys.exit(1 if any(f.level == "fail" for f in findings) else 0)
