"""Records of cluster runs: submission ids, the local registry of submissions, and what a cluster run
leaves beside its outputs, so ``kscale status RUN`` works after the cluster is gone.

The registry: every submission, whatever its target, is ``$KSCALE_HOME/submissions/ID.json`` (default
``~/.kscale``), with an id derived from the spec (``submission_id``). Beside the outputs, two places,
both on the (shared) filesystem of the outputs:

- ``<output.path>/_progress.json`` is written by the executors while shards complete (see
  ``kscale.executors.progress``, which also mirrors it into Ray gauges); this module only reads it.
- the *record dir* (``cluster.record_dir``, default ``<output.path>.cluster``; a sibling, because the
  store refuses to be created in a non-empty directory) holds, per submission id ``ID``:
  ``ID.job.yaml`` (the spec as submitted), ``ID.sbatch`` / ``ID.yaml`` (the rendered script or
  manifest), ``ID.driver.log`` (driver stdout+stderr, which include worker output because the
  driver runs with ``log_to_driver``), ``ID.state.json`` (the driver's state and exit code),
  ``ID.env`` (``cluster.env``, 0600, Slurm and Ray Jobs) and, on Slurm, ``ray-logs/ID/`` (every node's
  Ray session logs). On Slurm and Ray Jobs the folder is 0700 and checked to be the user's
  (:func:`kscale.private.private_dir`).

Every target starts the driver the same way, through ``driver_command`` ->
``python -m kscale.targets.records driver ...`` (a stable entry name that rendered scripts and
running clusters use; it runs :func:`main` here), which tees the driver's output into the record dir and
writes the state file at start and end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import kscale
from kscale.output import write_json_atomic
from kscale.private import (ENV_FILE_VAR, UnsafePath, private_dir, read_env_file, write_env_file,  # noqa: F401
                            write_private)
from kscale.spec.cluster import SECRET_PLACEHOLDER, cluster_of, redact_env  # noqa: F401



# ----------------------------------------------------------------------------- submission ids and the local registry


def slug(text: str, limit: int = 16) -> str:
    """Lowercase letters, digits and dashes, starting with a letter: safe for Ray, Slurm and DNS-1035."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if not s or not s[0].isalpha():
        s = f"j-{s}"[:limit].strip("-")
    return s


def submission_id(spec: Any, force: bool = False) -> str:
    """``kscale-<name>-<hash>[-f<time>]``, at most 44 characters (a RayJob name may have 47). The hash covers
    the spec's fingerprint, kscale's version and the absolute output path (the same YAML submitted from
    another directory writes elsewhere, so it is another job)."""
    key = f"{spec.fingerprint()}:{kscale.__version__}:{Path(spec.output.path).expanduser().absolute()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    sid = f"kscale-{slug(spec.name)}-{digest}"
    return f"{sid}-f{int(time.time()):x}" if force else sid


def kscale_home() -> Path:
    return Path(os.environ.get("KSCALE_HOME") or Path.home() / ".kscale")


def save_submission(record: dict) -> Path:
    """Remember a submission (id, target, address / Slurm job id / namespace, paths) on this machine."""
    path = kscale_home() / "submissions" / f"{record['id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    return path


def load_submission(sid: str) -> dict | None:
    try:
        return json.loads((kscale_home() / "submissions" / f"{sid}.json").read_text())
    except (OSError, ValueError):
        return None


def list_submissions(limit: int = 20) -> list[dict]:
    """The most recent submissions recorded on this machine, newest first."""
    d = kscale_home() / "submissions"
    files = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if d.is_dir() else []
    out = []
    for f in files[:limit]:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def list_runs(limit: int = 20) -> list[dict]:
    """:func:`list_submissions` with each run's last recorded state (``state``): the driver's state file in
    the record dir; a local RUNNING whose driver is gone reads DIED."""
    out = []
    for sub in list_submissions(limit):
        rec = Path(sub["record_dir"]) if sub.get("record_dir") else None
        st = (read_json(rec / f"{sub['id']}.state.json") or latest_state(rec)) if rec else None
        state = (st or {}).get("state")
        if sub.get("target") == "local" and state == "RUNNING":
            from kscale.targets.local import driver_alive

            state = state if driver_alive(st or {}) else "DIED"
        out.append({**sub, "state": state, "message": (st or {}).get("message")})
    return out


REDACTED = SECRET_PLACEHOLDER


def redact_override(item: str) -> str:
    """One ``--set KEY=VALUE`` as records and logs may show it: the value of ``cluster.env.X`` replaced by the
    placeholder; ``cluster.env={...}`` and ``cluster={...}`` (which may hold ``env``) keep their keys only."""
    key, sep, text = item.partition("=")
    k = key.strip()
    if not sep or not (k in ("cluster", "cluster.env") or k.startswith("cluster.env.")):
        return item
    if k.startswith("cluster.env."):
        return f"{key}={REDACTED}"
    from kscale.spec import parse_yaml

    try:
        value = parse_yaml(text)
    except Exception:  # unparseable: show nothing of it
        return f"{key}={REDACTED}"
    if not isinstance(value, dict):
        return f"{key}={REDACTED}"
    value = redact_env({"cluster": value})["cluster"] if k == "cluster" else {n: REDACTED for n in value}
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}"


def redact_overrides(overrides: tuple[str, ...] | list[str]) -> list[str]:
    return [redact_override(o) for o in overrides]


def env_file(rec_dir: Path, sid: str) -> Path:
    """Where a run's ``cluster.env`` goes (0600, in the record dir): sourced by the Slurm script, read by the
    Ray Jobs driver wrapper and workers (``KSCALE_ENV_FILE``)."""
    return rec_dir / f"{sid}.env"


def absolute_spec_yaml(spec_path: str, cwd: str | None = None) -> str:
    """The job YAML with ``output.path``, ``data.path`` and an existing local ``model.path`` made absolute,
    so the driver (whose working dir is a temporary package on the head) writes where the user meant."""
    base = Path(cwd or os.getcwd())
    raw = yaml.safe_load(Path(spec_path).read_text())

    def fix(section: str, must_exist: bool) -> None:
        sec = raw.get(section)
        p = sec.get("path") if isinstance(sec, dict) else None
        if isinstance(p, str) and not p.startswith("debug:") and not Path(p).expanduser().is_absolute():
            if not must_exist or (base / p).exists():
                sec["path"] = str((base / p).resolve())

    fix("output", False)
    fix("data", False)
    fix("model", True)
    return yaml.safe_dump(redact_env(raw), sort_keys=False)


def absolute_output(spec: Any) -> str:
    return str(Path(spec.output.path).expanduser().absolute())


@dataclass
class Run:
    """What is known about one run from the command line's RUN argument (``cli_cluster.resolve_run``)."""

    sid: str | None
    record: dict | None       # $KSCALE_HOME/submissions/ID.json, when submitted from here
    output: str | None        # the output path, when known
    rec_dir: Path | None      # the record dir, when known


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_dir(spec: Any, output_path: str | None = None) -> Path:
    """Where the run's records go: ``cluster.record_dir`` or ``<output.path>.cluster`` (absolute)."""
    configured = cluster_of(spec).record_dir
    base = Path(configured) if configured else Path(str(output_path or spec.output.path).rstrip("/") + ".cluster")
    return base.expanduser().absolute()


def read_json(path: Path) -> dict | None:
    """A JSON record, or None when it is absent or half-written (writers replace files atomically)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_progress(output_path: str | Path) -> dict | None:
    return read_json(Path(output_path) / "_progress.json")


def mark_progress_stopped(output_path: str | Path) -> dict | None:
    """After a stop (Ctrl-C, ``kscale stop``, ``scancel``): a ``_progress.json`` left "running" by the
    interrupted stage now says "stopped", so ``kscale status`` does not show a dead run as running.
    Returns the snapshot as it stands."""
    progress = read_progress(output_path)
    if progress and progress.get("state") == "running":
        progress = {**progress, "state": "stopped", "updated_at": now()}
        write_json_atomic(Path(output_path) / "_progress.json", progress)
    return progress


def _spec_output(spec_file: str) -> str | None:
    """The output path of the job spec the driver runs (None when it cannot be read)."""
    from kscale.spec import SpecError, load_spec

    try:
        return str(Path(load_spec(spec_file, check_model=False).output.path).expanduser().absolute())
    except (SpecError, OSError):
        return None


def latest_state(rec_dir: Path) -> dict | None:
    """The most recently updated ``*.state.json`` of a record dir."""
    states = sorted(rec_dir.glob("*.state.json"), key=lambda p: p.stat().st_mtime) if rec_dir.is_dir() else []
    return read_json(states[-1]) if states else None


def format_progress(p: dict) -> str:
    """One line: ``extract demo: running, shards 5/8 (2 skipped, 0 failed), 40 samples (3.2/s), 1.2 MB``."""
    if "shards_total" not in p and p.get("summary"):  # analyze / train: the stage's own summary line
        return f"{p.get('stage', '?')} {p.get('job', '?')}: {p.get('state', '?')}; {p['summary']}"
    if "units_total" in p:  # analyze / train while running (executors.progress.StageBar)
        total = p["units_total"] or "?"
        rates = "".join([f", {p['MB_per_s']} MB/s" if p.get("bytes") else "",
                         f", {p['tokens_per_s']} tokens/s" if p.get("tokens") else ""])
        return (f"{p.get('stage', '?')} {p.get('job', '?')}: {p.get('state', '?')}, {p.get('unit', 'unit')}s "
                f"{p.get('units_done', 0)}/{total}{rates}" + (f" ({p['detail']})" if p.get("detail") else "")
                + (f", updated {p['updated_at']}" if p.get("updated_at") else ""))
    total = p.get("shards_total", 0)
    finished = p.get("shards_done", 0) + p.get("shards_skipped", 0) + p.get("shards_failed", 0)
    line = (f"{p.get('stage', '?')} {p.get('job', '?')}: {p.get('state', '?')}, shards {finished}/{total} "
            f"({p.get('shards_skipped', 0)} skipped, {p.get('shards_failed', 0)} failed), "
            f"{p.get('samples', 0)} samples ({p.get('samples_per_s', 0)}/s), {p.get('bytes', 0) / 1e6:.2f} MB")
    return line + format_nodes(p) + (f", updated {p['updated_at']}" if p.get("updated_at") else "")


def format_nodes(p: dict) -> str:
    """Where a Ray run's shards went (``nodes`` of the progress snapshot): ``; 2 nodes (1 lost): 3f2a91c0 4
    shards, 77d0e1b2 1 shard (lost, 1 worker lost), 1 worker replaced``; empty for a run without Ray nodes."""
    nodes = p.get("nodes") or {}
    if not nodes:
        return ""
    parts = []
    for node_id, n in sorted(nodes.items(), key=lambda kv: -kv[1].get("shards_done", 0)):
        done = n.get("shards_done", 0)
        notes = (["lost"] if n.get("node_lost") else []) + (
            [f"{n['actors_lost']} worker{'s' * (n['actors_lost'] != 1)} lost"] if n.get("actors_lost") else [])
        parts.append(f"{node_id[:8]} {done} shard{'s' * (done != 1)}" + (f" ({', '.join(notes)})" if notes else ""))
    lost = sum(1 for n in nodes.values() if n.get("node_lost"))
    replaced = p.get("replaced_actors", 0)
    return (f"; {len(nodes)} node{'s' * (len(nodes) != 1)}" + (f" ({lost} lost)" if lost else "") + ": "
            + ", ".join(parts) + (f", {replaced} worker{'s' * (replaced != 1)} replaced" if replaced else ""))


# ----------------------------------------------------------------------------- the driver wrapper


def driver_command(python: str, spec_file: str, submission_id: str, target: str, rec_dir: str) -> list[str]:
    """The command every target runs on the cluster: the wrapper around ``kscale submit SPEC``.
    ``spec_file`` may be ``env:VAR`` for a spec shipped inline in the runtime environment."""
    return [python, "-m", "kscale.targets.records", "driver", "--id", submission_id,
            "--target", target, "--record-dir", rec_dir, spec_file]


def materialize_spec(spec_file: str, submission_id: str, rec_dir: Path) -> str:
    """Keep the spec as run in the record dir (``ID.job.yaml``) and return the path the driver reads.
    ``env:VAR`` takes the YAML text from the environment variable VAR (KubeRay's clusterSelector mode,
    where no ConfigMap can be mounted into an existing cluster)."""
    copy = rec_dir / f"{submission_id}.job.yaml"
    if spec_file.startswith("env:"):
        var = spec_file[4:]
        if not os.environ.get(var):
            raise SystemExit(f"kscale driver: environment variable {var} with the job spec is empty or unset")
        copy.write_text(os.environ[var])
        return str(copy)
    if Path(spec_file).resolve() != copy.resolve():
        copy.write_text(Path(spec_file).read_text())
    return spec_file


DRIVER_STOP_GRACE_S = 10.0  # a signalled driver is killed after this: its record is written before Slurm's KillWait
DRIVER_STOP_FILE_GRACE_S = 120.0  # asked through its stop file, its cluster is up: time for a clean shutdown


def driver_stop_file(rec_dir: Path, submission_id: str) -> Path:
    """Created by ``kscale stop`` (Slurm) to ask the driver to stop while its cluster stays up: the driver then
    shuts down cleanly and the job's script stops its services in order (nothing is cancelled)."""
    return rec_dir / f"{submission_id}.stop" / "driver"


def _watch(stop_file: Path, proc: subprocess.Popen, stop: Any) -> None:
    while proc.poll() is None:
        if stop_file.exists():
            stop(signal.SIGTERM, DRIVER_STOP_FILE_GRACE_S)
            return
        time.sleep(0.5)


def run_driver(spec_file: str, submission_id: str, target: str, rec_dir: Path, python: str = sys.executable) -> int:
    """Run ``kscale submit SPEC`` (which joins the cluster through ``RAY_ADDRESS``), tee its output into
    ``ID.driver.log`` and record its state; return its exit code. SIGTERM/SIGINT are passed on, so
    ``kscale stop``, ``scancel`` and Slurm's pre-timeout signal stop the driver cleanly; so does the stop file
    (:func:`driver_stop_file`)."""
    child_env = {**os.environ, "KSCALE_SUBMISSION_ID": submission_id}  # records are kept here
    try:
        if target == "k8s":  # no secret in it (cluster.env is a Secret); a PVC's fsGroup makes folders g+rw
            rec_dir.mkdir(parents=True, exist_ok=True)
        else:  # Slurm and Ray Jobs keep the env file (and Slurm the Ray token, TLS keys) here
            private_dir(rec_dir)
        if os.environ.get(ENV_FILE_VAR):  # Ray Jobs: cluster.env from the run's 0600 file, never the runtime env
            child_env.update(read_env_file(os.environ[ENV_FILE_VAR]))
    except UnsafePath as e:
        raise SystemExit(f"kscale driver: {e} (cluster.env needs the record dir on a filesystem this cluster "
                         "shares with the submitting machine, owned by the same user)") from e
    spec_file = materialize_spec(spec_file, submission_id, rec_dir)
    state_path = rec_dir / f"{submission_id}.state.json"
    state = {"submission_id": submission_id, "target": target, "state": "RUNNING", "host": socket.gethostname(),
             "pid": os.getpid(), "started_at": now(), "ray_address": os.environ.get("RAY_ADDRESS")}
    write_json_atomic(state_path, state)
    cmd = [python, "-m", "kscale.cli", "submit", spec_file, "--no-progress"]
    print(f"kscale driver: {' '.join(cmd)} (RAY_ADDRESS={os.environ.get('RAY_ADDRESS')})", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env)
    stopped = []

    def stop(signum: int, grace_s: float) -> None:
        stopped.append(signum)
        proc.send_signal(signum)
        if len(stopped) == 1:  # after scancel the cluster dies too and a clean ray.shutdown() can hang
            timer = threading.Timer(grace_s, lambda: proc.poll() is None and proc.kill())
            timer.daemon = True
            timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _frame: stop(signum, DRIVER_STOP_GRACE_S))
    threading.Thread(target=_watch, args=(driver_stop_file(rec_dir, submission_id), proc, stop),
                     daemon=True).start()
    with open(rec_dir / f"{submission_id}.driver.log", "ab") as log:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
    code = proc.wait()
    final = "SUCCEEDED" if code == 0 else ("STOPPED" if stopped else "FAILED")
    output = _spec_output(spec_file) if final == "STOPPED" else None
    if output:
        mark_progress_stopped(output)
    write_json_atomic(state_path, {**state, "state": final, "exit_code": code, "ended_at": now()})
    print(f"kscale driver: {final} (exit code {code}); records in {rec_dir}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kscale.targets.records",
                                 description="Cluster-side wrapper: run the kscale driver and keep its records.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("driver", help="run `kscale submit SPEC` on the cluster, tee logs, record state")
    d.add_argument("--id", required=True)
    d.add_argument("--target", required=True, choices=["ray", "slurm", "k8s"])
    d.add_argument("--record-dir", required=True)
    d.add_argument("spec")
    args = ap.parse_args(argv)
    return run_driver(args.spec, args.id, args.target, Path(args.record_dir))


if __name__ == "__main__":
    sys.exit(main())
