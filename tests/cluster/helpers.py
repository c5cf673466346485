"""Helpers of the cluster tests: ports, our own processes, a clean environment, the real CLI."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DEMO = REPO / "jobs" / "demo.yaml"


def free_port_block(n: int, lo: int = 40000, hi: int = 60000) -> int:
    """A base port with ``n`` consecutive free ports, outside Ray's worker range 10002-19999."""
    for _ in range(200):
        base = random.randrange(lo, hi - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("0.0.0.0", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports found")


def own_pids(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (a temp dir unique to a fixture): processes we started."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def clean_env(home: Path, kscale_home: Path) -> dict[str, str]:
    """Our own HOME (Ray token) and KSCALE_HOME (submission records), no inherited RAY_*/SLURM_* settings,
    the venv first on PATH (as on a real cluster) and one debug-model cache shared by all tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env.update(HOME=str(home), KSCALE_HOME=str(kscale_home), PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("KSCALE_CACHE", str(Path(tempfile.gettempdir()) / "kscale-test-cache"))
    return env


def kscale(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "kscale.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
