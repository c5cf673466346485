"""What a cluster run leaves beside its outputs, so ``kscale status RUN`` works after the cluster is gone.

Two places, both on the (shared) filesystem of the outputs:

- ``<output.path>/_progress.json`` is written by the executors while shards complete (see
  ``kscale.executors.progress``); this module only reads it.
- the *record dir* (``cluster.record_dir``, default ``<output.path>.cluster``; a sibling, because the
  store refuses to be created in a non-empty directory) holds, per submission id ``ID``:
  ``ID.job.yaml`` (the spec as submitted), ``ID.sbatch`` / ``ID.yaml`` (the rendered script or
  manifest), ``ID.driver.log`` (driver stdout+stderr, which include worker output because the
  driver runs with ``log_to_driver``), ``ID.state.json`` (the driver's state and exit code) and,
  on Slurm, ``ray-logs/ID/`` (every node's Ray session logs).

Every target starts the driver the same way, through ``driver_command`` ->
``python -m kscale.executors.progress_files driver ...``, which tees the driver's output into the record
dir and writes the state file at start and end. ``publish_metrics`` mirrors a progress snapshot into Ray
gauges so the dashboard's Metrics view shows the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kscale.executors.cluster_config import cluster_of


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_dir(spec: Any, output_path: str | None = None) -> Path:
    """Where the run's records go: ``cluster.record_dir`` or ``<output.path>.cluster`` (absolute)."""
    configured = cluster_of(spec).record_dir
    base = Path(configured) if configured else Path(str(output_path or spec.output.path).rstrip("/") + ".cluster")
    return base.expanduser().absolute()


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A JSON record, or None when it is absent or half-written (writers replace files atomically)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_progress(output_path: str | Path) -> dict | None:
    return read_json(Path(output_path) / "_progress.json")


def latest_state(rec_dir: Path) -> dict | None:
    """The most recently updated ``*.state.json`` of a record dir."""
    states = sorted(rec_dir.glob("*.state.json"), key=lambda p: p.stat().st_mtime) if rec_dir.is_dir() else []
    return read_json(states[-1]) if states else None


def format_progress(p: dict) -> str:
    """One line: ``extract demo: running, shards 5/8 (2 skipped, 0 failed), 40 samples (3.2/s), 1.2 MB``."""
    total = p.get("shards_total", 0)
    finished = p.get("shards_done", 0) + p.get("shards_skipped", 0) + p.get("shards_failed", 0)
    line = (f"{p.get('stage', '?')} {p.get('job', '?')}: {p.get('state', '?')}, shards {finished}/{total} "
            f"({p.get('shards_skipped', 0)} skipped, {p.get('shards_failed', 0)} failed), "
            f"{p.get('samples', 0)} samples ({p.get('samples_per_s', 0)}/s), {p.get('bytes', 0) / 1e6:.2f} MB")
    return line + (f", updated {p['updated_at']}" if p.get("updated_at") else "")


# ----------------------------------------------------------------------------- the driver wrapper


def driver_command(python: str, spec_file: str, submission_id: str, target: str, rec_dir: str) -> list[str]:
    """The command every target runs on the cluster: the wrapper around ``kscale submit SPEC``.
    ``spec_file`` may be ``env:VAR`` for a spec shipped inline in the runtime environment."""
    return [python, "-m", "kscale.executors.progress_files", "driver", "--id", submission_id,
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


def run_driver(spec_file: str, submission_id: str, target: str, rec_dir: Path, python: str = sys.executable) -> int:
    """Run ``kscale submit SPEC`` (which joins the cluster through ``RAY_ADDRESS``), tee its output into
    ``ID.driver.log`` and record its state; return its exit code. SIGTERM/SIGINT are passed on, so
    ``kscale stop``, ``scancel`` and Slurm's pre-timeout signal stop the driver cleanly."""
    rec_dir.mkdir(parents=True, exist_ok=True)
    spec_file = materialize_spec(spec_file, submission_id, rec_dir)
    state_path = rec_dir / f"{submission_id}.state.json"
    state = {"submission_id": submission_id, "target": target, "state": "RUNNING", "host": socket.gethostname(),
             "pid": os.getpid(), "started_at": now(), "ray_address": os.environ.get("RAY_ADDRESS")}
    write_json_atomic(state_path, state)
    cmd = [python, "-m", "kscale.cli", "submit", spec_file, "--no-progress"]
    print(f"kscale driver: {' '.join(cmd)} (RAY_ADDRESS={os.environ.get('RAY_ADDRESS')})", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stopped = []

    def forward(signum: int, _frame: Any) -> None:
        stopped.append(signum)
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    with open(rec_dir / f"{submission_id}.driver.log", "ab") as log:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
    code = proc.wait()
    final = "SUCCEEDED" if code == 0 else ("STOPPED" if stopped else "FAILED")
    write_json_atomic(state_path, {**state, "state": final, "exit_code": code, "ended_at": now()})
    print(f"kscale driver: {final} (exit code {code}); records in {rec_dir}", flush=True)
    return code


# ----------------------------------------------------------------------------- Ray dashboard metrics

_GAUGES: dict[str, Any] = {}


def publish_metrics(snapshot: dict) -> None:
    """Mirror a progress snapshot into Ray gauges (``kscale_shards``, ``kscale_samples``, ``kscale_tokens``,
    ``kscale_bytes``), tagged by job and stage; a no-op outside a Ray driver or worker."""
    import ray

    if not ray.is_initialized():
        return
    from ray.util.metrics import Gauge

    if not _GAUGES:
        _GAUGES["shards"] = Gauge("kscale_shards", "Shards by state", tag_keys=("job", "stage", "state"))
        _GAUGES["samples"] = Gauge("kscale_samples", "Samples processed", tag_keys=("job", "stage"))
        _GAUGES["tokens"] = Gauge("kscale_tokens", "Tokens stored by modality", tag_keys=("job", "stage", "modality"))
        _GAUGES["bytes"] = Gauge("kscale_bytes", "Bytes of keys written", tag_keys=("job", "stage"))
    tags = {"job": str(snapshot.get("job")), "stage": str(snapshot.get("stage"))}
    for st in ("total", "done", "skipped", "failed"):
        _GAUGES["shards"].set(snapshot.get(f"shards_{st}", 0), tags={**tags, "state": st})
    _GAUGES["samples"].set(snapshot.get("samples", 0), tags=tags)
    _GAUGES["bytes"].set(snapshot.get("bytes", 0), tags=tags)
    for modality, n in (snapshot.get("tokens") or {}).items():
        _GAUGES["tokens"].set(n, tags={**tags, "modality": modality})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kscale.executors.progress_files",
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
