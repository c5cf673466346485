"""Preflight pieces every target shares: a :class:`Finding` (level, message, fix), the installed versions
against kscale's requirements, GPUs seen here, and the fixed ports. ``kscale doctor`` (:mod:`kscale.doctor`)
runs them through each target's ``checks()``."""

from __future__ import annotations

import importlib.metadata as md
import platform
import socket
from dataclasses import asdict, dataclass
from typing import Any

from kscale.spec.cluster import PORT_BLOCK, RAY_WORKER_PORTS, cluster_of

LEVEL_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "info": "info"}


REPORTED = ("torch", "transformers", "ray", "zarr", "dask", "numpy")


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

