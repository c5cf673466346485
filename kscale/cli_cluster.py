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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from kscale.executors import jobs
from kscale.executors.jobs import JobsError
from kscale.executors.progress_files import format_progress, latest_state, read_json, read_progress, record_dir
from kscale.spec import SpecError, load_spec


def _say(text: str) -> None:
    click.echo(text)


def _err(text: str) -> None:
    click.echo(text, err=True)


def submit_remote(spec_path: str, spec: Any, target: str, address: str | None, dry_run: bool, force: bool) -> int:
    """``kscale submit`` for ``--target slurm|k8s`` or a Ray Jobs API address; prints, returns the exit code."""
    from kscale.executors import k8s, slurm

    try:
        if target == "slurm":
            return slurm.submit(spec_path, spec, force, dry_run, _say)
        if target == "k8s":
            return k8s.submit(spec_path, spec, force, dry_run, _say)
        return _submit_ray(spec_path, spec, address, dry_run, force)
    except SpecError as e:
        _err(str(e))
        return 2
    except (JobsError, slurm.SlurmError, k8s.K8sError) as e:
        _err(f"kscale submit: {e}")
        return 2


def _submit_ray(spec_path: str, spec: Any, address: str | None, dry_run: bool, force: bool) -> int:
    sid = jobs.submission_id(spec, force)
    if dry_run:
        _say(f"kscale: would submit {sid} to {jobs.resolve_address(address)} with runtime env "
             f"{json.dumps(jobs.runtime_env(spec, '<dir with job.yaml>', sid))}")
        _say(jobs.absolute_spec_yaml(spec_path).rstrip("\n"))
        return 0
    t0 = time.monotonic()
    r = jobs.submit(spec_path, spec, address, force, _say)
    if not r.attached:
        _say(f"kscale: submitted {r.submission_id} to {r.address} in {time.monotonic() - t0:.1f} s")
        _say(f"kscale: follow with `kscale logs -f {r.submission_id} --address {r.address}`")
        return 0
    if r.status in ("FAILED", "STOPPED"):
        _err(f"kscale: {r.submission_id} was submitted before and ended {r.status}; `kscale submit --force` starts "
             "a new run (committed shards are kept and skipped)")
        return 1
    _say(f"kscale: {r.submission_id} is already on {r.address} ({r.status}); attached instead of submitting a "
         f"duplicate (--force for a new run). Follow with `kscale logs -f {r.submission_id}`")
    return 0


# ----------------------------------------------------------------------------- resolving a RUN argument


@dataclass
class Run:
    sid: str | None
    record: dict | None       # $KSCALE_HOME/submissions/ID.json, when submitted from here
    output: str | None        # the output path, when known
    rec_dir: Path | None      # the record dir, when known


def resolve_run(arg: str | None) -> Run:
    """Turn a submission id, job YAML or run directory into what we know about that run."""
    if arg is None:
        recent = jobs.list_submissions(1)
        if not recent:
            raise click.UsageError("no RUN given and no submissions recorded on this machine")
        arg = recent[0]["id"]
    p = Path(arg)
    if p.is_dir():
        out = str(p.absolute())
        if out.endswith(".cluster"):
            return Run(_sid_in(p), None, out[: -len(".cluster")], p.absolute())
        rec = Path(out + ".cluster")
        sid = _sid_in(rec)
        return Run(sid, jobs.load_submission(sid) if sid else None, out, rec)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        try:
            spec = load_spec(p, check_model=False)
        except SpecError as e:
            raise click.UsageError(str(e)) from e
        sid = jobs.submission_id(spec)
        record = jobs.load_submission(sid)
        out = (record or {}).get("output") or str(Path(spec.output.path).expanduser().absolute())
        return Run(sid, record, out, Path(record["record_dir"]) if record and record.get("record_dir")
                   else record_dir(spec, out))
    record = jobs.load_submission(arg)
    rec = Path(record["record_dir"]) if record and record.get("record_dir") else None
    return Run(arg, record, (record or {}).get("output"), rec)


def _sid_in(rec: Path) -> str | None:
    st = latest_state(rec)
    if st:
        return st.get("submission_id")
    scripts = sorted(rec.glob("*.job.yaml"), key=lambda f: f.stat().st_mtime) if rec.is_dir() else []
    return scripts[-1].name[: -len(".job.yaml")] if scripts else None


def _target(run: Run, address: str | None) -> str | None:
    if address:
        return "ray"
    return (run.record or {}).get("target")


# ----------------------------------------------------------------------------- status


@click.command()
@click.argument("run", required=False)
@click.option("--address", default=None, help="Ray Jobs API address (default: the one recorded at submit).")
@click.option("--json", "as_json", is_flag=True, help="Print everything known as JSON.")
def status(run: str | None, address: str | None, as_json: bool) -> None:
    """State and progress of RUN (submission id, job YAML or run directory); no RUN: recent submissions."""
    if run is None and not as_json:
        subs = jobs.list_submissions()
        if not subs:
            _say("kscale: no submissions recorded on this machine")
            return
        for s in subs:
            where = s.get("address") or s.get("slurm_job_id") or s.get("namespace") or ""
            _say(f"{s['id']:44s} {s['target']:6s} {str(where):26s} {s.get('saved_at', '')}  {s.get('output', '')}")
        return
    r = resolve_run(run)
    info: dict[str, Any] = {"submission_id": r.sid, "target": _target(r, address), "output": r.output}
    info["cluster"] = _cluster_state(r, address)
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


def _cluster_state(r: Run, address: str | None) -> dict | None:
    """What the cluster itself says, or None when it cannot be asked (gone, unreachable, unknown)."""
    target = _target(r, address)
    try:
        if target == "ray" and r.sid:
            client, url = jobs.connect(address or (r.record or {}).get("address"))
            info = jobs.job_info(client, r.sid)
            return None if info is None else {"status": jobs.status_name(info.status), "message": info.message,
                                                 "address": url}
        if target == "slurm" and r.record:
            from kscale.executors import slurm

            return {"status": slurm.run_state(r.record), "slurm_job_id": r.record["slurm_job_id"]}
        if target == "k8s" and r.record:
            from kscale.executors import k8s

            st = k8s.rayjob_status(r.sid, r.record["namespace"])
            return None if st is None else {"status": st.get("jobStatus") or st.get("jobDeploymentStatus"),
                                            "deployment": st.get("jobDeploymentStatus"),
                                            "message": st.get("message")}
    except (JobsError, OSError, RuntimeError) as e:
        return {"status": "UNREACHABLE", "message": str(e).splitlines()[0]}
    return None


def _print_status(info: dict) -> None:
    _say(f"run       {info.get('submission_id') or '?'}  (target {info.get('target') or 'unknown'})")
    c = info.get("cluster")
    if c:
        extra = "".join(f", {k} {v}" for k, v in c.items() if k != "status" and v)
        _say(f"cluster   {c.get('status')}{extra}")
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
    target = _target(r, address)
    write = lambda s: click.echo(s, nl=False)  # noqa: E731
    try:
        if target == "ray" and r.sid:
            client, _ = jobs.connect(address or (r.record or {}).get("address"))
            if jobs.job_info(client, r.sid) is not None:
                final = jobs.follow_logs(client, r.sid, write, follow=follow)
                sys.exit(0 if final in ("SUCCEEDED", "RUNNING", "PENDING") else 1)
        if target == "slurm" and r.record:
            sys.exit(_slurm_logs(r, follow, write))
        if target == "k8s" and r.record:
            sys.exit(_k8s_logs(r, follow))
    except JobsError as e:
        _err(f"kscale logs: {e}; showing the log kept beside the outputs instead")
    log = r.rec_dir / f"{r.sid}.driver.log" if r.rec_dir and r.sid else None
    if log is None or not log.is_file():
        raise click.ClickException(f"no log for {run or r.sid}: the cluster does not know it and "
                                   f"{log or 'no record dir'} does not exist")
    write(log.read_text(errors="replace"))


def _slurm_logs(r: Run, follow: bool, write: Callable[[str], None]) -> int:
    from kscale.executors import slurm

    rec, sid = Path(r.record["record_dir"]), r.sid
    printed = 0
    while True:
        state = slurm.run_state(r.record)
        out = slurm.slurm_output(rec, sid)
        if out is not None:
            with open(out, errors="replace") as fh:
                fh.seek(printed)
                chunk = fh.read()
            if chunk:
                write(chunk)
                printed += len(chunk.encode())
        if not follow or state not in slurm.ACTIVE_STATES:
            if out is None:
                _err(f"kscale logs: Slurm job {r.record['slurm_job_id']} is {state}; no output yet in {rec}")
            return 0 if state not in ("FAILED", "CANCELLED", "TIMEOUT", "STOPPED", "NODE_FAIL") else 1
        time.sleep(1.0)


def _k8s_logs(r: Run, follow: bool) -> int:
    import subprocess

    ns = r.record["namespace"]
    cmd = ["kubectl", "logs", "-n", ns, f"job/{r.sid}"] + (["-f"] if follow else [])
    return subprocess.call(cmd)


# ----------------------------------------------------------------------------- stop


@click.command()
@click.argument("run", required=False)
@click.option("--address", default=None, help="Ray Jobs API address (default: the one recorded at submit).")
def stop(run: str | None, address: str | None) -> None:
    """Stop RUN: the Ray job, the Slurm job (its script stops its own Ray) or the RayJob. Committed shards stay."""
    r = resolve_run(run)
    target = _target(r, address)
    try:
        if target == "ray" and r.sid:
            client, url = jobs.connect(address or (r.record or {}).get("address"))
            _say(f"kscale: {r.sid} on {url}: {jobs.stop(client, r.sid)}")
            return
        if target == "slurm" and r.record:
            from kscale.executors import slurm

            slurm.cancel(r.record["slurm_job_id"])
            _say(f"kscale: cancelled Slurm job {r.record['slurm_job_id']} ({r.sid})")
            return
        if target == "k8s" and r.record:
            from kscale.executors import k8s

            ns = r.record["namespace"]
            for kind, name in (("rayjob", r.sid), ("configmap", f"{r.sid}-spec")):
                p = k8s.kubectl("delete", kind, name, "-n", ns, "--ignore-not-found")
                _say(p.stdout.strip() or p.stderr.strip())
            return
    except JobsError as e:
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
    from kscale.executors import k8s, slurm

    try:
        spec = load_spec(job, check_model=False)
        sid = jobs.submission_id(spec)
        if target == "slurm":
            outp = str(Path(spec.output.path).expanduser().absolute())
            rec = record_dir(spec, outp)
            text = slurm.render_script(spec, sid, rec, rec / f"{sid}.job.yaml", str(Path.cwd()),
                                       slurm.default_python(spec), source=job)
        elif target == "k8s":
            text = k8s.to_yaml(k8s.render_rayjob(spec, job, sid))
        else:
            text = k8s.to_yaml([k8s.render_raycluster(spec)])
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
