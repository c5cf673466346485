"""The analysis's own LocalCluster (``analyze.dask.scheduler: distributed``, no address) is private to the run.

Another local user who finds its port must be unable to connect or run code in its workers: every comm is
TLS with the run's certificate, which the outsider has not got, and nothing listens off loopback. The
outsider here is a separate process that tries what the review did (a plain ``Client(addr)``, and a TLS
client with a certificate of its own) and, were it let in, would create a marker file from a worker; as a
control, the same attempt with the run's certificate gets in and runs code.
(That the analysis over this cluster still equals the threaded run is
``test_analysis_outofcore.py::test_distributed_analysis_equals_threaded``.)
"""

from __future__ import annotations

import json
import operator
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from kscale.analysis.stream import Runner
from kscale.spec.analyze import DaskConfig

OUTSIDER = """
import json, sys
from distributed import Client
from distributed.security import Security

addr, marker, tls_dir = sys.argv[1], sys.argv[2], sys.argv[3]
host_port = addr.split("://", 1)[-1]


def attempt(address, security=None, marker=marker):
    try:
        c = Client(address, timeout=4, security=security() if security else None)
    except Exception as e:  # refused in the TLS handshake, or no TLS at all: never connected
        return f"refused: {type(e).__name__}: {str(e)[:200]}"
    try:
        c.submit(lambda: open(marker, "w").write("ran code as the run's owner"), pure=False).result(timeout=30)
        return "ran code"
    finally:
        c.close()


def the_runs_cert():
    cert, key = tls_dir + "/cert.pem", tls_dir + "/key.pem"
    return Security(require_encryption=True, tls_ca_file=cert, tls_client_cert=cert, tls_client_key=key)


print(json.dumps({
    "plain": attempt(addr),
    "plain_tcp": attempt("tcp://" + host_port),
    "tls_own_cert": attempt("tls://" + host_port, Security.temporary),
    "control_with_the_runs_cert": attempt(addr, the_runs_cert, marker=marker + ".control"),
}))
"""


def _tree(proc: psutil.Process) -> list[int]:
    return [proc.pid, *(p.pid for p in proc.children(recursive=True))]


def _listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket of these processes."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_the_local_cluster_refuses_outsiders_and_listens_on_loopback_only(tmp_path):
    me = psutil.Process()
    before = set(_listening(_tree(me)))  # what other tests of the session may have left listening
    with Runner(DaskConfig(scheduler="distributed", n_workers=1)) as runner:
        addr = runner.client.scheduler.address
        tls_dir = runner._tls_dir
        marker = tmp_path / "PWNED"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(OUTSIDER), addr, str(marker), str(tls_dir)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        tried = json.loads(proc.stdout.strip().splitlines()[-1])
        control = tried.pop("control_with_the_runs_cert")
        assert set(tried) == {"plain", "plain_tcp", "tls_own_cert"}
        assert all(v.startswith("refused") for v in tried.values()), tried
        assert not marker.exists()
        assert control == "ran code" and Path(f"{marker}.control").exists()  # the attempts could succeed

        workers = list(runner.client.scheduler_info()["workers"])
        assert addr.startswith("tls://127.0.0.1:"), addr
        assert workers and all(w.startswith("tls://127.0.0.1:") for w in workers), workers
        # every socket the cluster listens on (scheduler, nanny, worker, the scheduler's and workers' HTTP
        # servers: dashboard, metrics) in this process and the worker processes is on loopback
        opened = [s for s in _listening(_tree(me)) if s not in before]
        assert len(opened) >= 4, opened  # scheduler, dashboard, nanny, worker (at least)
        assert all(ip == "127.0.0.1" for _, ip, _ in opened), opened
        assert runner.client.dashboard_link.startswith("http://127.0.0.1:")
        # the credentials: a 0700 folder of 0600 files, for this run only
        assert stat.S_IMODE(tls_dir.stat().st_mode) == stat.S_IMODE(tls_dir.parent.stat().st_mode) == 0o700
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tls_dir.iterdir()} == {"cert.pem": 0o600,
                                                                                       "key.pem": 0o600}
        assert runner.client.submit(operator.add, 2, 2).result() == 4  # the run's own client: still let in
    assert not tls_dir.parent.exists()  # the credentials do not outlive the run


def test_a_cluster_that_fails_to_start_leaves_no_credentials(tmp_path, monkeypatch):
    """``__exit__`` does not run when ``__enter__`` raises: the Runner removes the key folder itself."""
    import distributed
    import tempfile

    def no_cluster(*args, **kwargs):
        raise RuntimeError("no cluster today")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    runner = Runner(DaskConfig(scheduler="distributed", n_workers=1))
    with pytest.raises(RuntimeError, match="no cluster today"):
        runner.__enter__()
    assert runner._tls_dir is not None and runner._tls_dir.parent.parent == tmp_path  # keys were made ...
    assert list(tmp_path.iterdir()) == []  # ... and removed
