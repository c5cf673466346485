"""``kscale submit job.yaml --target slurm``: render an sbatch script from the spec and submit it.

The script is three parts (``render_script``): an ``#SBATCH`` header computed from ``cluster.slurm``
and ``resources``; a block of ``KSCALE_*`` settings, modules and setup lines; and a fixed body
(``kscale/templates/slurm/body.sh``) that starts Ray (or, for analysis jobs, a ``dask.distributed``
cluster) across the allocation, waits for every node, runs the driver wrapper
(``kscale.targets.records``) and stops only the processes it started. The body calls back
into this module (``python -m kscale.targets.slurm wait-ray|wait-dask``) to wait for the nodes.

Everything the run leaves (script, spec copy, Slurm output, driver log, state, Ray logs) goes to the
record dir on the shared filesystem (``records.record_dir``). The Slurm job is named after the
submission id, so a second submit of the same job finds it in ``squeue`` and attaches instead of
queueing a duplicate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources as pkg_resources
from pathlib import Path
from typing import Any, Callable

import kscale
from kscale.spec import STAGES, SpecError
from kscale.targets import Target
from kscale.targets.checks import Finding, check_ports
from kscale.spec.cluster import cluster_of
from kscale.private import private_dir, write_env_file, write_private
from kscale.targets.records import (Run, absolute_spec_yaml, driver_stop_file, env_file, latest_state, read_json,
                                    record_dir, save_submission, submission_id)

ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


class SlurmError(RuntimeError):
    """sbatch/squeue/scancel failed or are missing; the message says what to do."""


@dataclass(frozen=True)
class SlurmShape:
    nodes: int
    gpus_per_node: int
    cpus_per_node: int


def shape(spec: Any) -> SlurmShape:
    """Nodes, GPUs and CPUs per node: ``cluster.slurm`` where set, else what the job needs: for analysis, one
    CPU per dask thread (``analyze.dask.n_workers``: each node's dask worker runs that many threads), for the
    other stages what ``resources`` asks for."""
    s, r = cluster_of(spec).slurm, spec.resources
    gpus = s.gpus_per_node if s.gpus_per_node is not None else math.ceil(r.workers * r.gpus_per_worker / s.nodes)
    stage = STAGES[spec.kind]
    if s.cpus_per_node is not None:
        cpus = s.cpus_per_node
    elif stage.cluster_cpus is not None:
        cpus = stage.cluster_cpus(spec)
    else:
        cpus = max(1, math.ceil(r.workers * r.cpus_per_worker / s.nodes))
    return SlurmShape(s.nodes, gpus, cpus)


def runtime_for(spec: Any) -> str:
    """What the script starts before the driver (the stage table's ``runtime``): ``dask`` for analysis,
    ``ray`` for Ray executors, else none."""
    return STAGES[spec.kind].runtime_of(spec)


def default_python(spec: Any) -> str:
    c = cluster_of(spec)
    if c.python:
        return c.python
    return "python" if c.slurm.container_image else sys.executable


def sbatch_header(spec: Any, sid: str, rec_dir: Path, cwd: str) -> list[str]:
    s, sh = cluster_of(spec).slurm, shape(spec)
    for field, value in (("output.path", str(rec_dir)), ("working directory", cwd)):
        if any(ch in value for ch in "\n\r"):  # #SBATCH lines are not quoted: one line each
            raise SpecError([(field, f"{value[:60]!r} contains a newline; it cannot go into an sbatch script")])
    lines = [f"--job-name={sid}", f"--nodes={sh.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={sh.cpus_per_node}"]
    if sh.gpus_per_node:
        lines.append(f"--gpus-per-node={s.gpu_type + ':' if s.gpu_type else ''}{sh.gpus_per_node}")
    lines.append(f"--time={s.time}")
    for opt in ("partition", "account", "qos", "mem"):
        if getattr(s, opt):
            lines.append(f"--{opt}={getattr(s, opt)}")
    if s.exclusive:
        lines.append("--exclusive")
    lines += [f"--output={rec_dir}/{sid}.slurm-%j.out", f"--chdir={cwd}"]
    if s.grace_s:
        lines.append(f"--signal=B:TERM@{s.grace_s}")
    lines += list(s.sbatch_args)
    return [f"#SBATCH {line}" for line in lines]


def settings_block(spec: Any, sid: str, rec_dir: Path, spec_copy: Path, python: str) -> list[str]:
    c = cluster_of(spec)
    store = c.ray.object_store_gb
    values = {
        "KSCALE_ID": sid, "KSCALE_SPEC": str(spec_copy), "KSCALE_RECORD_DIR": str(rec_dir),
        "KSCALE_PYTHON": python, "KSCALE_RUNTIME": runtime_for(spec),
        "KSCALE_PORT_BASE": "" if c.ray.port_base is None else str(c.ray.port_base),
        "KSCALE_DASHBOARD_HOST": c.ray.dashboard_host, "KSCALE_TMP_BASE": c.ray.temp_dir,
        "KSCALE_NODE_WAIT_S": str(c.ray.node_wait_s),
        "KSCALE_OBJECT_STORE_BYTES": "" if store is None else str(int(store * 1e9)),
        "KSCALE_CONTAINER_IMAGE": c.slurm.container_image or "",
        "KSCALE_CONTAINER_MOUNTS": ",".join(c.slurm.container_mounts),
    }
    out = ["# ---- settings, from the spec's cluster section (edit the spec, then render again)"]
    out += [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    if c.env:  # values stay out of the script (0644, in the queue): a 0600 file written at submit, sourced here
        out.append(f"# cluster.env ({', '.join(sorted(c.env))}), for the driver and every worker: values in a "
                   "0600 file, not here")
        out.append("set -a")  # a directive covers one command: the source line, written at submit time
        out.append("# shellcheck disable=SC1090,SC1091")
        out.append(f"source {shlex.quote(str(env_file(rec_dir, sid)))}")
        out.append("set +a")
    if c.slurm.modules:
        out.append("# cluster.slurm.modules")
        out += [f"module load {shlex.quote(m)}" for m in c.slurm.modules]
    if c.slurm.setup:
        out += ["# cluster.slurm.setup: runs once here; srun steps inherit the environment",
                "# shellcheck disable=SC1090,SC1091"]
        out += list(c.slurm.setup)
    return out


def body() -> str:
    return pkg_resources.files("kscale").joinpath("templates/slurm/body.sh").read_text()


def one_line(text: str) -> str:
    """``text`` for a comment of the script: as is when it is plain printable text, else JSON-quoted, so a
    newline in a job name or file name can never start a line of its own (a command for bash)."""
    return text if text.isprintable() and text.isascii() and text.strip() == text else json.dumps(text)


def render_script(spec: Any, sid: str, rec_dir: Path, spec_copy: Path, cwd: str, python: str,
                  source: str = "job.yaml") -> str:
    """The full sbatch script; deterministic for given inputs (golden-file tested)."""
    head = ["#!/bin/bash",
            f"# kscale {kscale.__version__}: {spec.kind} job {spec.name!r}, submission {sid}.",
            f"# Rendered from {one_line(source)} by `kscale submit --target slurm`; change the spec, not this file."]
    head += sbatch_header(spec, sid, rec_dir, cwd)
    parts = ["\n".join(head), "set -euo pipefail", "\n".join(settings_block(spec, sid, rec_dir, spec_copy, python)),
             body().rstrip("\n")]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- talking to Slurm


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found: run on a Slurm login node (or install slurm-client)")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SlurmError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def find_active(name: str) -> tuple[str, str] | None:
    """(job id, state) of this user's queued or running Slurm job named ``name``."""
    out = _run(["squeue", "--noheader", f"--name={name}", "--format=%i %T"]).split()
    return (out[0], out[1]) if len(out) >= 2 else None


def live_on_same_output(base_sid: str) -> tuple[str, str, str] | None:
    """(job id, name, state) of this user's queued or running job of the same spec and output (its name is
    ``base_sid`` or a forced ``base_sid-f<time>``), if any."""
    out = _run(["squeue", "--noheader", "--me", "--format=%i %j %T"])
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and (parts[1] == base_sid or parts[1].startswith(base_sid + "-f")):
            return parts[0], parts[1], parts[2]
    return None


def job_state(job_id: str) -> str | None:
    """Slurm's state of a job (squeue, then scontrol for recently finished jobs); None when forgotten."""
    out = subprocess.run(["squeue", "--noheader", "-j", job_id, "--format=%T"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()[0]
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", out.stdout)
    return m.group(1) if m else None


def cancel(job_id: str) -> None:
    _run(["scancel", job_id])


def submit(spec_path: str, spec: Any, force: bool, dry_run: bool, say: Callable[[str], None] = print) -> int:
    """Render, write the records and sbatch the job (or attach to the identical one already queued)."""
    sid = submission_id(spec, force)
    out_path = str(Path(spec.output.path).expanduser().absolute())
    rec = record_dir(spec, out_path)
    spec_copy = rec / f"{sid}.job.yaml"
    script = render_script(spec, sid, rec, spec_copy, os.getcwd(), default_python(spec), source=spec_path)
    if dry_run:
        say(script.rstrip("\n"))
        return 0
    if force:  # a forced rerun must not write into a store another job of this spec still writes
        live = live_on_same_output(submission_id(spec))
        if live:
            raise SlurmError(f"Slurm job {live[0]} ({live[1]}, {live[2]}) still runs this job on {out_path}; "
                             f"stop it first (`kscale stop {live[1]}`) or wait for it")
    active = find_active(sid)
    if active:
        say(f"kscale: {sid} is already {active[1]} as Slurm job {active[0]}; attached (use --force for a new run)")
        return 0
    prior = read_json(rec / f"{sid}.state.json")
    if prior and prior.get("state") == "SUCCEEDED":
        say(f"kscale: {sid} already finished successfully ({prior.get('ended_at')}); --force runs it again")
        return 0
    private_dir(rec)  # ours, not writable by others: nothing in it (env file, Ray token, TLS key) can be planted
    spec_copy.write_text(absolute_spec_yaml(spec_path))
    if cluster_of(spec).env:
        write_env_file(env_file(rec, sid), cluster_of(spec).env)
    script_path = rec / f"{sid}.sbatch"
    script_path.write_text(script)
    job_id = _run(["sbatch", "--parsable", str(script_path)]).strip().split(";")[0]
    save_submission({"id": sid, "target": "slurm", "slurm_job_id": job_id, "spec": str(Path(spec_path).absolute()),
                     "output": out_path, "record_dir": str(rec), "submitted_at_epoch": time.time()})
    if prior:
        say(f"kscale: previous run of {sid} ended {prior.get('state')}; this one resumes committed shards")
    say(f"kscale: submitted {sid} as Slurm job {job_id}; records in {rec}")
    say(f"kscale: follow with `kscale logs -f {sid}`, check with `kscale status {sid}`")
    return 0


def slurm_output(rec: Path, sid: str) -> Path | None:
    """The newest Slurm output file of a submission (the script's own log: node start-up, tunnel line)."""
    files = sorted(rec.glob(f"{sid}.slurm-*.out"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def run_state(record: dict) -> str:
    """One word for a recorded Slurm submission: Slurm's state while queued/running, else the driver's."""
    st = job_state(record["slurm_job_id"]) if shutil.which("squeue") else None
    if st in ACTIVE_STATES:
        return st
    driver = read_json(Path(record["record_dir"]) / f"{record['id']}.state.json") or latest_state(Path(record["record_dir"]))
    if driver and driver.get("state") not in (None, "RUNNING"):
        return driver["state"]
    return st or "UNKNOWN"


# ----------------------------------------------------------------------------- waiting, inside the job


def wait_ray(address: str, nodes: int, timeout: float) -> int:
    """Block until ``nodes`` Ray nodes are alive at ``address`` (GCS), or fail after ``timeout`` seconds."""
    import ray

    deadline = time.monotonic() + timeout
    ray.init(address=address, logging_level="error", log_to_driver=False)
    try:
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes:
                res = ray.cluster_resources()
                print(f"kscale: {alive} Ray node(s) up: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU", flush=True)
                return 0
            if time.monotonic() > deadline:
                print(f"kscale: only {alive}/{nodes} Ray nodes joined within {timeout:g} s "
                      "(see the worker steps' output above)", file=sys.stderr, flush=True)
                return 1
            time.sleep(1.0)
    finally:
        ray.shutdown()


def write_dask_tls(folder: Path) -> int:
    """``cert.pem`` and ``key.pem`` from dask's ``Security.temporary()`` (a fresh self-signed pair that every
    role of this job's dask cluster shares), in a 0700 folder as 0600 files; the sbatch body removes them."""
    from distributed.security import Security

    sec = Security.temporary()
    private_dir(folder)
    write_private(folder / "cert.pem", sec.tls_scheduler_cert)
    write_private(folder / "key.pem", sec.tls_scheduler_key)
    return 0


def wait_dask(scheduler_file: str, workers: int, timeout: float) -> int:
    """Block until ``workers`` dask workers are connected to the scheduler in ``scheduler_file``."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    while not Path(scheduler_file).exists():
        if time.monotonic() > deadline:
            print(f"kscale: no dask scheduler file at {scheduler_file} after {timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    with Client(scheduler_file=scheduler_file, timeout=max(1.0, deadline - time.monotonic())) as client:
        try:
            client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            print(f"kscale: fewer than {workers} dask workers within {timeout:g} s", file=sys.stderr)
            return 1
        print(f"kscale: {len(client.scheduler_info()['workers'])} dask worker(s) up", flush=True)
    return 0


# ----------------------------------------------------------------------------- preflight (kscale doctor --target slurm)


def check_slurm(spec: Any | None) -> list[Finding]:
    if shutil.which("sbatch") is None:
        return [Finding("slurm", "fail", "sbatch not found", "run on a Slurm login node, or module load slurm")]
    part = cluster_of(spec).slurm.partition if spec is not None else None
    cmd = ["sinfo", "--noheader", "-o", "%P %a %G %D"] + (["-p", part] if part else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode != 0 or not p.stdout.strip():
        return [Finding("slurm", "fail", f"sinfo {'for partition ' + part if part else ''} gave nothing: "
                                         f"{p.stderr.strip()[:200]}", "check cluster.slurm.partition (sinfo -s lists them)")]
    out = [Finding("slurm", "ok", "partitions: " + "; ".join(p.stdout.split("\n")[:5]))]
    if spec is not None and spec.resources.gpus_per_worker > 0 and "gpu" not in p.stdout:
        out.append(Finding("slurm", "warn", "the job needs GPUs but sinfo lists no gpu GRES in the partition",
                           "pick a GPU partition (cluster.slurm.partition)"))
    out.append(Finding("slurm", "info", "GPUs per node are checked inside an allocation: run `kscale doctor "
                                        "--address http://HEAD:PORT` once the job prints its dashboard line"))
    return out



class SlurmTarget(Target):
    """Slurm: one sbatch script per submission that starts Ray (or dask) in the allocation and the driver."""

    name = "slurm"
    errors = (SlurmError,)

    def submit(self, spec_path: str, spec: Any, address: str | None, dry_run: bool, force: bool,
               say: Callable[[str], None], err: Callable[[str], None]) -> int:
        return submit(spec_path, spec, force, dry_run, say)

    def status(self, run: Run, address: str | None) -> dict | None:
        if not run.record:
            return None
        return {"status": run_state(run.record), "slurm_job_id": run.record["slurm_job_id"]}

    def logs(self, run: Run, address: str | None, follow: bool, write: Callable[[str], None],
             err: Callable[[str], None]) -> int | None:
        """Print the job's Slurm output (following it while the job is active)."""
        if not run.record:
            return None
        rec, sid = Path(run.record["record_dir"]), run.sid
        printed = 0
        while True:
            state = run_state(run.record)
            out = slurm_output(rec, sid)
            if out is not None:
                with open(out, errors="replace") as fh:
                    fh.seek(printed)
                    chunk = fh.read()
                if chunk:
                    write(chunk)
                    printed += len(chunk.encode())
            if not follow or state not in ACTIVE_STATES:
                if out is None:
                    err(f"kscale logs: Slurm job {run.record['slurm_job_id']} is {state}; no output yet in {rec}")
                return 0 if state not in ("FAILED", "CANCELLED", "TIMEOUT", "STOPPED", "NODE_FAIL") else 1
            time.sleep(1.0)

    def stop(self, run: Run, address: str | None, say: Callable[[str], None]) -> bool:
        if not run.record:
            return False
        job_id = run.record["slurm_job_id"]
        state = job_state(job_id)
        if state is None:  # Slurm forgot it (MinJobAge): the driver's record says how it ended
            driver = read_json(Path(run.record["record_dir"]) / f"{run.sid}.state.json") or {}
            state = driver.get("state") if driver.get("state") not in (None, "RUNNING") else None
        if state is not None and state not in ACTIVE_STATES:
            say(f"kscale: Slurm job {job_id} ({run.sid}) already finished ({state}); nothing to stop")
            return True
        stop_file = driver_stop_file(Path(run.record["record_dir"]), run.sid)
        if state == "RUNNING" and not stop_file.exists():  # first stop: the driver ends cleanly, then the job
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()
            say(f"kscale: asked {run.sid}'s driver to stop (Slurm job {job_id} ends once it has and its services "
                "are stopped; committed shards stay). `kscale stop` again cancels the job at once.")
            return True
        cancel(job_id)
        say(f"kscale: cancelled Slurm job {job_id} ({run.sid})")
        return True

    def render(self, spec: Any, spec_path: str, sid: str) -> str:
        rec = record_dir(spec, str(Path(spec.output.path).expanduser().absolute()))
        return render_script(spec, sid, rec, rec / f"{sid}.job.yaml", str(Path.cwd()), default_python(spec),
                             source=spec_path)

    def checks(self, spec: Any | None, spec_path: str | None, address: str | None) -> list[Finding]:
        return check_ports(spec) + check_slurm(spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kscale.targets.slurm", description="Helpers the sbatch body calls.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("wait-ray")
    r.add_argument("--address", required=True)
    r.add_argument("--nodes", type=int, required=True)
    r.add_argument("--timeout", type=float, default=300)
    d = sub.add_parser("wait-dask")
    d.add_argument("--scheduler-file", required=True)
    d.add_argument("--workers", type=int, required=True)
    d.add_argument("--timeout", type=float, default=300)
    t = sub.add_parser("dask-tls", help="write a per-job TLS key and certificate for dask (0600 files)")
    t.add_argument("--dir", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "dask-tls":
        return write_dask_tls(Path(a.dir))
    if a.cmd == "wait-ray":
        return wait_ray(a.address, a.nodes, a.timeout)
    return wait_dask(a.scheduler_file, a.workers, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
