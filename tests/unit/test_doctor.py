"""kscale doctor: each check finds the problem it is for, and says how to fix it."""

from __future__ import annotations

import http.server
import socket
import threading
from types import SimpleNamespace

import pytest

from kscale import doctor
from kscale.spec.cluster import ClusterConfig, RayConfig


def test_unwritable_output_fails_with_a_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    (f,) = doctor.check_output(str(blocker / "keys"))  # a path under a regular file: not creatable
    assert f.level == "fail" and "cannot write" in f.message and f.fix


def test_writable_output_reports_free_space(tmp_path):
    found = {f.check: f for f in doctor.check_output(str(tmp_path / "runs" / "keys"))}
    assert found["output"].level == "ok" and found["disk"].message.endswith(f"free at {tmp_path}")


def _with_ports(base: int) -> SimpleNamespace:
    return SimpleNamespace(cluster=ClusterConfig(ray=RayConfig(port_base=base)))


def test_ports_inside_rays_worker_range_fail():
    (f,) = doctor.check_ports(_with_ports(15000))
    assert f.level == "fail" and "10002-19999" in f.message and "20000" in f.fix


def test_busy_port_is_reported():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        if busy < 20000 or busy > 65525:
            pytest.skip(f"the OS gave port {busy}, not usable as a port_base")
        (f,) = doctor.check_ports(_with_ports(busy))
    assert f.level == "warn" and str(busy) in f.message


def test_versions_outside_kscales_requirements_fail():
    found = doctor.check_versions({"python": "3.10.4", "torch": "2.1.0", "ray": "2.60.0", "zarr": None},
                                  "on the cluster")
    msgs = {f.message: f for f in found if f.level == "fail"}
    assert any(m.startswith("Python 3.10.4 on the cluster") for m in msgs)
    torch = next(f for m, f in msgs.items() if m.startswith("torch 2.1.0"))
    assert "pip install 'torch" in torch.fix
    assert any(m.startswith("zarr is not installed") for m in msgs)


def test_probe_results_are_judged():
    nodes = [{"host": "n1", "cpus": 16, "gpus": 2}]
    versions = doctor.installed_versions()
    ok = doctor._judge_probe({"nodes": nodes, "unplaced": 0, "versions": versions, "actors": [
        {"host": "n1", "cuda_visible_devices": "0", "torch_gpus": 1}, {"host": "n1", "cuda_visible_devices": "1",
                                                                      "torch_gpus": 1}]}, 2, 1.0)
    assert all(f.level == "ok" for f in ok)
    short = doctor._judge_probe({"nodes": nodes, "unplaced": 2, "versions": versions, "actors": []}, 4, 1.0)
    assert any(f.level == "fail" and "2 of 4 worker actors" in f.message for f in short)
    blind = doctor._judge_probe({"nodes": nodes, "unplaced": 0, "versions": versions, "actors": [
        {"host": "n1", "cuda_visible_devices": "0", "torch_gpus": 0}]}, 1, 1.0)
    assert any(f.level == "fail" and "see no GPU" in f.message for f in blind)


class _TokenServer(http.server.BaseHTTPRequestHandler):
    """A stand-in for Ray's dashboard auth middleware: 401 without a token, 403 with a wrong one."""

    def do_GET(self):
        auth = self.headers.get("Authorization")
        self.send_response(200 if auth == "Bearer right" else 403 if auth else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def token_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.parametrize("token, level, words", [(None, "fail", "has none"), ("wrong", "fail", "refused our token"),
                                                 ("right", "ok", "ours is accepted")])
def test_auth_findings(token_server, monkeypatch, tmp_path, token, level, words):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    if token:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    else:
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    (f,) = doctor.check_auth(token_server)
    assert f.level == level and words in f.message
    assert level == "ok" or "ray get-auth-token" in f.fix


def test_local_checks_pass_for_the_cpu_demo(tmp_path):
    from kscale.spec import spec_from_dict

    spec = spec_from_dict({"kind": "extract", "model": {"path": "debug:qwen2_5_vl"}, "data": {},
                           "output": {"path": str(tmp_path / "keys")}}, check_model=False)
    found = doctor.run_checks(spec, "local", None)
    assert {f.check for f in found} >= {"python", "versions", "output", "disk", "ports", "gpus"}
    assert not [f for f in found if f.level == "fail"], [f.line() for f in found]


def test_k8s_outputs_without_a_volume_warn(tmp_path):
    """Issue 12: `doctor` said ok for a k8s job whose outputs die with the pod."""
    import yaml

    from kscale.spec import load_spec
    from kscale.targets.k8s import check_output_volume

    d = {"kind": "extract", "name": "v", "model": {"path": "debug:qwen2_5_vl"},
         "data": {"source": "generated", "generated": {"n_samples": 4}}, "output": {"path": "runs/v"},
         "cluster": {"k8s": {"image": "img:1"}}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    assert [f.level for f in check_output_volume(load_spec(job, check_model=False))] == ["warn"]
    d["cluster"]["k8s"]["output_pvc"] = "data"
    job.write_text(yaml.safe_dump(d))
    assert [f.level for f in check_output_volume(load_spec(job, check_model=False))] == ["ok"]
    d["output"]["path"] = "/elsewhere/v"
    job.write_text(yaml.safe_dump(d))
    assert [f.level for f in check_output_volume(load_spec(job, check_model=False))] == ["warn"]


def test_extract_disk_need_is_an_upper_bound(tmp_path):
    from kscale.doctor import extract_disk_need
    from kscale.runner import run_job
    from kscale.spec import spec_from_dict
    from tests.conftest import extract_spec

    spec = spec_from_dict(extract_spec(tmp_path, extract={"batch_size": 4, "key_dtype": "float16"},
                                       data={"source": "generated", "generated": {"n_samples": 4, "image_size": 112},
                                             "shard_size": 4}))
    need, how = extract_disk_need(spec)
    assert "4 samples" in how
    result = run_job(spec, show_bar=False)
    assert 0 < result.bytes <= need
