"""Issue 11 finding 6: cluster scripts. A ``cluster.env`` secret appears in no rendered file and no record
(only in a 0600 env file or a Kubernetes Secret); values written into the sbatch script unquoted are
refused when they could break out of their line; the Slurm dask cluster speaks TLS with per-job 0600
credentials and refuses a client without them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kscale.spec import SpecError, load_spec
from tests.conftest import REPO

SECRET = "hf_S3CRET-value-9f8e7d"


def _job(tmp_path: Path, **cluster) -> Path:
    d = {"kind": "extract", "name": "sec", "model": {"path": "debug:qwen2_5_vl"},
         "data": {"source": "generated", "generated": {"n_samples": 4}, "shard_size": 2},
         "output": {"path": str(tmp_path / "out")}, "resources": {"executor": "ray", "workers": 1},
         "cluster": {"env": {"HF_TOKEN": SECRET, "HF_HOME": "/shared/hf"},
                     "k8s": {"image": "registry.example.com/kscale:0", "output_pvc": "runs"}, **cluster}}
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _no_secret(where: str, text: str) -> None:
    assert SECRET not in text, f"the cluster.env secret leaked into {where}"


def test_secret_is_in_no_rendered_file_and_no_record(tmp_path, monkeypatch):
    from kscale.targets import k8s, slurm
    from kscale.targets.local import LocalRun
    from kscale.targets.records import absolute_spec_yaml, record_dir, write_env_file

    monkeypatch.setenv("KSCALE_HOME", str(tmp_path / "home"))
    job = _job(tmp_path)
    spec = load_spec(job, check_model=False)
    sid = "kscale-sec-0000000000"
    rec = record_dir(spec)
    _no_secret("the sbatch script", slurm.render_script(spec, sid, rec, rec / f"{sid}.job.yaml", str(tmp_path),
                                                        sys.executable))
    _no_secret("the Slurm spec copy", absolute_spec_yaml(str(job)))
    docs = k8s.render_rayjob(spec, str(job), sid)
    _no_secret("the RayJob + ConfigMap", k8s.to_yaml(docs))
    _no_secret("the RayCluster", k8s.to_yaml([k8s.render_raycluster(spec)]))
    pods = [c for d in docs if d["kind"] == "RayJob"
            for g in [d["spec"]["rayClusterSpec"]["headGroupSpec"], *d["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
            for c in g["template"]["spec"]["containers"]]
    assert all(c["envFrom"] == [{"secretRef": {"name": k8s.env_secret_name(sid)}}] for c in pods)
    assert k8s.env_secret(spec, sid)["stringData"]["HF_TOKEN"] == SECRET  # applied through kubectl's stdin only

    env = write_env_file(rec / f"{sid}.env", spec.cluster.env)
    assert stat.S_IMODE(env.stat().st_mode) == 0o600 and SECRET in env.read_text()
    out = subprocess.run(["bash", "-c", f"set -a; source {env}; set +a; printf %s \"$HF_TOKEN\""],
                         capture_output=True, text=True)
    assert out.stdout == SECRET  # the script gets the value back from the file

    with LocalRun(spec, str(job), overrides=("data.shard_size=2",)) as run:
        print("a line of driver output")
        run.finish(0)
    for f in (tmp_path / "home").rglob("*"):
        if f.is_file():
            _no_secret(str(f), f.read_text(errors="replace"))
    assert json.loads(next((tmp_path / "home" / "submissions").glob("*.json")).read_text())[
        "spec_values"]["cluster"]["env"]["HF_TOKEN"] != SECRET


@pytest.mark.parametrize("field,value", [("partition", "gpu\nrm -rf ~"), ("account", "a;b"), ("partition", "gpu\n"), ("qos", "$(id)"),
                                         ("gpu_type", "h100 --x"), ("container_image", "img\n")])
def test_shell_values_with_newlines_or_metacharacters_are_refused(tmp_path, field, value):
    job = _job(tmp_path, slurm={field: value})
    with pytest.raises(SpecError) as e:
        load_spec(job, check_model=False)
    assert f"cluster.slurm.{field}" in str(e.value)


def test_newline_in_output_path_is_refused_by_the_slurm_renderer(tmp_path):
    from kscale.targets import slurm

    job = _job(tmp_path)
    raw = yaml.safe_load(job.read_text())
    raw["output"]["path"] = str(tmp_path / "a\nb")
    job.write_text(yaml.safe_dump(raw))
    spec = load_spec(job, check_model=False)
    with pytest.raises(SpecError, match="newline"):
        slurm.SlurmTarget().render(spec, str(job), "kscale-sec-0000000000")


def test_dask_tls_credentials_are_private_and_required(tmp_path):
    """The body's `dask-tls` step, then a TLS scheduler as the body starts it: a client with the job's
    credentials (through the DASK_* variables the body exports) connects; one without them cannot."""
    tls = tmp_path / "job.dask-tls"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "kscale.targets.slurm", "dask-tls", "--dir", str(tls)], check=True, env=env)
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    for f in ("cert.pem", "key.pem"):
        assert stat.S_IMODE((tls / f).stat().st_mode) == 0o600
    sched_file = tmp_path / "sched.json"
    args = ["--tls-ca-file", str(tls / "cert.pem"), "--tls-cert", str(tls / "cert.pem"), "--tls-key", str(tls / "key.pem")]
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "tls", *args,
                             "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                             "--scheduler-file", str(sched_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tls://")
        client_env = {**env, "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
                      "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tls / "cert.pem"),
                      "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tls / "cert.pem"),
                      "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tls / "key.pem")}
        probe = ("import sys; from distributed import Client\n"
                 f"c = Client(scheduler_file={str(sched_file)!r}, timeout=10); print('connected'); c.close()")
        ok = subprocess.run([sys.executable, "-c", probe], env=client_env, capture_output=True, text=True, timeout=120)
        assert "connected" in ok.stdout, ok.stderr[-2000:]
        bare = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert "connected" not in bare.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
