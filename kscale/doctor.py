"""``kscale doctor``: a preflight before a job is submitted; every finding comes with a fix.

``run_checks(spec, target, address)`` runs the checks that apply:

- here: Python and package versions against kscale's own requirements, GPUs torch can see, free disk
  and write access at the output path, the fixed ports kscale would use (free, outside Ray's worker
  range 10002-19999);
- ``--address`` (a running Ray cluster): the Jobs API answers, token auth is satisfied, and a probe job
  (``python -m kscale.doctor probe``) reports each node's CPUs/GPUs, what one actor per worker actually
  sees (``CUDA_VISIBLE_DEVICES``, ``torch.cuda.device_count()``) and the versions installed there;
- ``--target slurm``: sbatch present, partition known, GPUs in the partition;
- ``--target k8s``: kubectl, a reachable cluster with KubeRay, an image, and the rendered RayJob passing
  kscale's checks (and the CRD schema where ``KSCALE_KUBERAY_SCHEMAS`` points at it).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kscale.executors.cluster_config import PORT_BLOCK, RAY_WORKER_PORTS, cluster_of

LEVEL_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "info": "info"}
REPORTED = ("torch", "transformers", "ray", "zarr", "dask", "numpy")
MIN_FREE_GB, WARN_FREE_GB = 1.0, 20.0


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # ok | warn | fail | info
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"[{LEVEL_MARK[self.level]}] {self.check:12s} {self.message}" + (f"\n       fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- versions


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*REPORTED, "kscale"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check_versions(versions: dict[str, str | None], where: str = "here") -> list[Finding]:
    """Each package kscale requires, against its specifier in kscale's metadata."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    try:
        requires = [Requirement(r) for r in md.requires("kscale") or [] if "extra ==" not in r]
        py_spec = SpecifierSet(md.metadata("kscale")["Requires-Python"] or "")
    except md.PackageNotFoundError:
        return [Finding("versions", "warn", "kscale is not installed as a package; versions not checked",
                        "pip install -e . (or pip install kscale)")]
    out = []
    py = versions.get("python") or ""
    if py and py not in py_spec:
        out.append(Finding("python", "fail", f"Python {py} {where}; kscale needs {py_spec}",
                           f"use a Python matching {py_spec}"))
    else:
        out.append(Finding("python", "ok", f"Python {py} {where}"))
    bad = []
    for req in requires:
        have = versions.get(req.name)
        if req.name not in versions:
            continue
        if have is None:
            bad.append(Finding("versions", "fail", f"{req.name} is not installed {where}", f"pip install '{req}'"))
        elif req.specifier and have not in req.specifier:
            bad.append(Finding("versions", "fail", f"{req.name} {have} {where}; kscale needs {req.specifier}",
                               f"pip install '{req}'"))
    listed = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "python" and v)
    return out + (bad or [Finding("versions", "ok", f"{listed} ({where})")])


# ----------------------------------------------------------------------------- local resources


def check_local_gpus(spec: Any | None) -> list[Finding]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    need = 0.0
    if spec is not None:
        need = spec.resources.workers * spec.resources.gpus_per_worker
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(n)) if n else "none"
    if need > n:
        return [Finding("gpus", "fail", f"the job needs {need:g} GPU(s) here, torch sees {n} ({names})",
                        "run on a GPU node, check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi), or lower "
                        "resources.workers / gpus_per_worker")]
    return [Finding("gpus", "ok", f"torch sees {n} GPU(s) here ({names}); the job needs {need:g} here")]


def check_output(path: str | None) -> list[Finding]:
    """Write access and free space at the output path (its nearest existing parent)."""
    if not path:
        return []
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kscale-doctor-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return [Finding("output", "fail", f"cannot write in {probe} (for {p}): {e.strerror}",
                        "choose an output.path you can write to, or fix the directory's permissions")]
    free_gb = shutil.disk_usage(probe).free / 1e9
    if free_gb < MIN_FREE_GB:
        return [Finding("disk", "fail", f"{free_gb:.1f} GB free at {probe}", "free space or move output.path")]
    level = "warn" if free_gb < WARN_FREE_GB else "ok"
    fix = "keys of a real model take tens of GB: check the estimate in docs/store.md" if level == "warn" else ""
    return [Finding("output", "ok", f"{p} is writable"), Finding("disk", level, f"{free_gb:.1f} GB free at {probe}", fix)]


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(spec: Any | None) -> list[Finding]:
    """The fixed ports kscale would start Ray on (``cluster.ray.port_base``): free here, outside the worker range."""
    base = cluster_of(spec).ray.port_base if spec is not None else None
    if base is None:
        return [Finding("ports", "ok", "no fixed ports configured: on Slurm each job derives its own from the job id "
                                       "(20000 + 10 x (id mod 4000)), outside Ray's worker range")]
    ports = range(base, base + PORT_BLOCK)
    lo, hi = RAY_WORKER_PORTS
    if any(lo <= p <= hi for p in ports):
        return [Finding("ports", "fail", f"cluster.ray.port_base {base} overlaps Ray's worker ports {lo}-{hi}",
                        "set cluster.ray.port_base to 20000 or above")]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        return [Finding("ports", "warn", f"port(s) {busy} are in use on this host",
                        "another Ray (or service) holds them: pick another cluster.ray.port_base, or leave it "
                        "unset on Slurm")]
    return [Finding("ports", "ok", f"ports {base}-{base + PORT_BLOCK - 1} free here and outside {lo}-{hi}")]


# ----------------------------------------------------------------------------- a running Ray cluster


def check_auth(url: str) -> list[Finding]:
    """Does the Jobs API need a token, and is ours accepted?"""
    from kscale.executors.jobs import read_token

    def get(token: str | None) -> int:
        req = urllib.request.Request(f"{url}/api/jobs/")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        anonymous = get(None)
    except OSError as e:
        return [Finding("reach", "fail", f"no answer from {url}: {e}",
                        "start the head, check the address and port, or tunnel: ssh -N -L 8265:127.0.0.1:8265 HEAD")]
    if anonymous == 200:
        return [Finding("auth", "warn", f"{url} accepts requests without a token",
                        "start the cluster with RAY_AUTH_MODE=token (anyone who reaches the port can run code)")]
    token = read_token()
    if token is None:
        return [Finding("auth", "fail", f"{url} requires a token and this machine has none",
                        "copy the token (`ray get-auth-token` on the head) into RAY_AUTH_TOKEN or ~/.ray/auth_token")]
    code = get(token)
    if code == 200:
        return [Finding("auth", "ok", f"{url} requires a token; ours is accepted")]
    return [Finding("auth", "fail", f"{url} refused our token (HTTP {code})",
                    "the token in RAY_AUTH_TOKEN / ~/.ray/auth_token is not this cluster's: `ray get-auth-token` on the head")]


def probe(workers: int, gpus_per_worker: float, cpus_per_worker: float, timeout: float = 60.0) -> dict:
    """Inside a cluster driver: nodes, and what ``workers`` actors with the job's resources see."""
    import ray

    @ray.remote
    class Probe:
        def look(self) -> dict:
            import torch

            return {"node": ray.get_runtime_context().get_node_id()[:8], "host": socket.gethostname(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "torch_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                    "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    ray.init(log_to_driver=False, logging_level="error")
    nodes = [{"host": n.get("NodeManagerHostname"), "cpus": n["Resources"].get("CPU", 0),
              "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n.get("Alive")]
    actors = [Probe.options(num_gpus=gpus_per_worker, num_cpus=cpus_per_worker).remote() for _ in range(workers)]
    refs = [a.look.remote() for a in actors]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    return {"nodes": nodes, "actors": ray.get(ready), "unplaced": len(pending), "versions": installed_versions()}


def check_cluster(spec: Any | None, address: str | None) -> list[Finding]:
    """Reach, auth, then a probe job reporting nodes, per-actor GPUs and versions on the cluster."""
    from kscale.executors import jobs

    try:
        url = jobs.resolve_address(address)
    except jobs.JobsError as e:
        return [Finding("reach", "fail", str(e))]
    found = check_auth(url)
    if any(f.level == "fail" for f in found):
        return found
    r = spec.resources if spec is not None else None
    workers, gpw, cpw = (r.workers, r.gpus_per_worker, r.cpus_per_worker) if r else (1, 0.0, 1.0)
    python = (cluster_of(spec).python if spec is not None else None) or "python"
    cmd = [python, "-m", "kscale.doctor", "probe", "--workers", str(workers), "--gpus-per-worker", str(gpw),
           "--cpus-per-worker", str(cpw)]
    try:
        client, _ = jobs.connect(url)
        sid = client.submit_job(entrypoint=shlex.join(cmd), runtime_env={"env_vars": dict(cluster_of(spec).env) if spec else {}})
        status = jobs.follow_logs(client, sid, lambda s: None, follow=True, poll_s=0.5, give_up_s=60)
        text = client.get_job_logs(sid)
    except (jobs.JobsError, RuntimeError, OSError) as e:
        return found + [Finding("probe", "fail", f"probe job failed to run: {e}")]
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("KSCALE_PROBE ")), None)
    if status != "SUCCEEDED" or line is None:
        tail = " | ".join(text.strip().splitlines()[-3:])
        return found + [Finding("probe", "fail", f"probe job {status}: {tail}",
                                f"is kscale installed for `{python}` on the head? set cluster.python, or "
                                "pip install kscale in the cluster's environment")]
    return found + _judge_probe(json.loads(line[len("KSCALE_PROBE "):]), workers, gpw)


def _judge_probe(p: dict, workers: int, gpw: float) -> list[Finding]:
    out = [Finding("nodes", "ok", "; ".join(f"{n['host']}: {n['cpus']:g} CPU, {n['gpus']:g} GPU" for n in p["nodes"]))]
    if p["unplaced"]:
        total = sum(n["gpus"] for n in p["nodes"])
        out.append(Finding("actors", "fail", f"{p['unplaced']} of {workers} worker actors could not be placed "
                                             f"(cluster has {total:g} GPU in all, the job needs {workers * gpw:g})",
                           "add GPU nodes, or lower resources.workers / gpus_per_worker"))
    blind = [a for a in p["actors"] if gpw > 0 and a["torch_gpus"] < max(1, int(gpw))]
    if blind:
        out.append(Finding("actors", "fail", f"{len(blind)} actor(s) see no GPU in torch despite num_gpus={gpw:g} "
                                             f"(e.g. {blind[0]})",
                           "CUDA driver/toolkit mismatch on that node, or a torch CPU build: check nvidia-smi and "
                           "torch.version.cuda there"))
    elif p["actors"]:
        seen = ", ".join(f"{a['host']}[{a['cuda_visible_devices'] or '-'}]" for a in p["actors"])
        out.append(Finding("actors", "ok", f"{len(p['actors'])} actor(s) placed; GPUs they see: {seen}"))
    return out + check_versions(p["versions"], "on the cluster")


# ----------------------------------------------------------------------------- Slurm / Kubernetes


def check_slurm(spec: Any | None) -> list[Finding]:
    import subprocess

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


def kuberay_schema_dir() -> Path | None:
    env = os.environ.get("KSCALE_KUBERAY_SCHEMAS")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "schemas" / "kuberay-v1")
    return next((c for c in candidates if (c / "ray.io_rayjobs.yaml").is_file()), None)


def check_k8s(spec: Any | None, spec_path: str | None) -> list[Finding]:
    from kscale.executors import k8s
    from kscale.spec import SpecError

    ok, why = k8s.cluster_reachable()
    out = [Finding("k8s", "ok" if ok else "warn", f"kubectl context {why}" if ok else why,
                   "" if ok else "kscale will write the manifest for you to apply elsewhere")]
    if spec is None or spec_path is None:
        return out
    try:
        docs = k8s.render_rayjob(spec, spec_path, "kscale-doctor-check")
    except SpecError as e:
        return out + [Finding("manifest", "fail", "; ".join(f"{f}: {m}" for f, m in e.problems), "set it in the spec")]
    problems = [p for d in docs if d["kind"] == "RayJob" for p in k8s.check_manifest(d, spec)]
    schema_dir = kuberay_schema_dir()
    try:
        import jsonschema  # noqa: F401  (optional: pip install jsonschema)
    except ImportError:
        schema_dir = None
    if schema_dir is not None:
        problems += [p for d in docs if d["kind"] == "RayJob" for p in k8s.validate_schema(d, schema_dir)]
    if problems:
        return out + [Finding("manifest", "fail", "; ".join(problems), "fix the cluster.k8s section")]
    checked = "kscale's checks and the KubeRay CRD schema" if schema_dir else "kscale's checks"
    return out + [Finding("manifest", "ok", f"rendered RayJob passes {checked}")]


def run_checks(spec: Any | None, target: str, address: str | None, spec_path: str | None = None) -> list[Finding]:
    findings = check_versions(installed_versions())
    findings += check_output(spec.output.path if spec is not None else None)
    if target in ("local", "slurm"):
        findings += check_ports(spec)
    if target == "local":
        findings += check_local_gpus(spec)
    if target == "ray" or address:
        findings += check_cluster(spec, address)
    if target == "slurm":
        findings += check_slurm(spec)
    if target == "k8s":
        findings += check_k8s(spec, spec_path)
    return findings


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kscale.doctor")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="run inside a Ray job: report nodes, per-actor GPUs and versions")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    result = probe(a.workers, a.gpus_per_worker, a.cpus_per_worker, a.timeout)
    result["seconds"] = round(time.monotonic() - t0, 2)
    print("KSCALE_PROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
