"""``kscale doctor``: a preflight before a job is submitted; every finding comes with a fix.

``run_checks(spec, target, address)`` runs the checks that apply (each target's own in its ``checks()``,
:mod:`kscale.targets`; the shared pieces in :mod:`kscale.targets.checks`):

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

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kscale.targets import get_target
from kscale.targets.checks import (Finding, check_local_gpus, check_ports, check_versions,  # noqa: F401
                                   installed_versions)
from kscale.targets.ray_jobs import _judge_probe, check_auth, check_cluster  # noqa: F401

MIN_FREE_GB, WARN_FREE_GB = 1.0, 20.0


# ----------------------------------------------------------------------------- here


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


def extract_disk_need(spec: Any) -> tuple[float, str] | None:
    """An upper bound on an extract job's key bytes, with how it was computed; None for other kinds or when
    the model or data cannot be read here. Tokens per sample: the sum of ``extract.sample_tokens`` caps
    when every modality is capped, else ``extract.max_seq_len``."""
    if spec is None or spec.kind != "extract" or spec.extract is None:
        return None
    try:
        from kscale.data import open_source
        from kscale.models import read_model_config, resolve_layers

        info = read_model_config(spec.model)
        n = len(open_source(spec.data))
        layers = len(resolve_layers(spec.extract.layers, info.num_layers, "extract.layers"))
    except Exception:  # noqa: BLE001  (doctor reports what it can; validate names the problem)
        return None
    heads = info.num_kv_heads if spec.extract.heads == "all" else len(spec.extract.heads)
    caps = [getattr(spec.extract.sample_tokens, m) for m in ("text", "image", "video", "special")]
    tokens = sum(caps) if all(isinstance(c, int) for c in caps) else spec.extract.max_seq_len
    width = 2 if spec.extract.key_dtype == "float16" else 4
    need = n * tokens * layers * heads * info.head_dim * width
    how = (f"{n} samples x <= {tokens} tokens x {layers} layers x {heads} KV heads x {info.head_dim} dims x "
           f"{width} B")
    return need, how


def check_disk_need(spec: Any) -> list[Finding]:
    """Compare the extract job's key-bytes bound with the free space at its output (warn when short)."""
    est = extract_disk_need(spec)
    if est is None:
        return []
    need, how = est
    probe = Path(spec.output.path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    text = f"keys need at most {need / 1e9:.2f} GB ({how}); {free / 1e9:.1f} GB free at {probe}"
    if need > free:
        return [Finding("disk-need", "warn", text, "free space, cap extract.sample_tokens, select fewer layers, "
                                                    "or move output.path")]
    return [Finding("disk-need", "ok", text)]


# ----------------------------------------------------------------------------- inside a Ray cluster (the probe job)


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


# ----------------------------------------------------------------------------- all checks for a target


def run_checks(spec: Any | None, target: str, address: str | None, spec_path: str | None = None) -> list[Finding]:
    findings = check_versions(installed_versions())
    findings += check_output(spec.output.path if spec is not None else None)
    if target in ("local", "ray") or address:  # on Slurm/K8s the output lives elsewhere
        findings += check_disk_need(spec)
    t = get_target(target)
    findings += t.checks(spec, spec_path, address)
    if address and t.name != "ray":  # --address with another target: check that cluster too
        findings += get_target("ray").checks(spec, spec_path, address)
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
