"""Issue 21 items 3 and 7: a ``cluster.env`` value given with ``--set`` reaches no file but the run's one 0600
env file (or a Kubernetes Secret applied through kubectl's stdin), no argv, no log, no Ray runtime env and no
rendered script or manifest, on every target; Kubernetes Secrets are per submission, deleted by ``kscale
stop``, and ``cluster.env`` with ``reuse_cluster`` is refused instead of dropped.

Each test plants a unique secret, runs the real CLI with fake ``sbatch``/``squeue``/``kubectl`` binaries (or a
fake Jobs API client) that record their argv, and then reads every file under the test's folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kscale.spec import SpecError, load_spec
from kscale.targets import k8s, records

SECRET = "hf_pl4nted-" + os.urandom(6).hex()


def _job(folder: Path, name: str = "sec", out: str = "out", executor: str = "local", **k8s_cfg) -> Path:
    d = {"kind": "extract", "name": name, "model": {"path": "debug:qwen2_5_vl"},
         "data": {"source": "generated", "generated": {"n_samples": 2, "image_size": 56}, "shard_size": 2},
         "extract": {"layers": [0], "batch_size": 2},
         "output": {"path": str(folder / out)}, "resources": {"executor": executor, "workers": 1},
         "cluster": {"env": {"HF_HOME": "/shared/hf"},
                     "k8s": {"image": "registry.example.com/kscale:0", "output_pvc": "runs", **k8s_cfg}}}
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _holders(root: Path) -> list[Path]:
    """Every file under ``root`` whose bytes contain the secret (links not followed)."""
    return sorted(f for f in root.rglob("*") if f.is_file() and not f.is_symlink() and SECRET.encode() in f.read_bytes())


def _only_env_file(root: Path, env_file: Path) -> None:
    assert _holders(root) == [env_file], "the secret is somewhere besides the run's env file"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o700


def _cli(args: list[str]):
    from kscale.cli import main

    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert SECRET not in r.output, "the secret was printed"
    return r


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KSCALE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    os.umask(0o002)  # as on a shared cluster: group-writable unless kscale says otherwise
    yield tmp_path / "home"
    os.umask(0o022)


def _fake_bins(tmp_path: Path, monkeypatch, scripts: dict[str, str]) -> Path:
    """Fake binaries first on PATH; each appends its argv (one JSON list a line) to ``calls/NAME``, outside
    the folders the tests search, and runs its script."""
    bins, calls = tmp_path / "bin", tmp_path.parent / f"{tmp_path.name}-calls"
    bins.mkdir()
    calls.mkdir()
    for name, body in scripts.items():
        f = bins / name
        f.write_text(f"#!{sys.executable}\nimport json, sys\nCALLS = {str(calls)!r}\n"
                     f"open(CALLS + '/{name}', 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n{body}\n")
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bins}:{os.environ['PATH']}")
    return calls


def _argv(calls: Path, name: str) -> list[list[str]]:
    f = calls / name
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


# ----------------------------------------------------------------------------- local


def test_local_run_records_no_secret(home, tmp_path):
    job = _job(tmp_path)
    r = _cli(["submit", str(job), "--no-progress", "--set", f"cluster.env.HF_TOKEN={SECRET}",
              "--set", f"cluster={{env: {{OTHER: {SECRET}x}}}}"])
    assert r.exit_code == 0, r.output
    assert _holders(tmp_path) == []  # submissions/ID.json, runs/ID/ID.state.json, ID.driver.log, the store
    (state,) = (home / "runs").glob("*/*.state.json")
    assert "cluster.env.HF_TOKEN=(secret, not recorded)" in json.loads(state.read_text())["overrides"]
    (log,) = (home / "runs").glob("*/*.driver.log")
    assert "--set 'cluster.env.HF_TOKEN=(secret, not recorded)'" in log.read_text()


# ----------------------------------------------------------------------------- Slurm


def test_slurm_submit_keeps_the_secret_in_the_env_file_only(home, tmp_path, monkeypatch):
    calls = _fake_bins(tmp_path, monkeypatch, {"squeue": "", "sbatch": "print('4242')"})
    job = _job(tmp_path)
    dry = _cli(["submit", str(job), "--target", "slurm", "--dry-run", "--set", f"cluster.env.HF_TOKEN={SECRET}"])
    assert dry.exit_code == 0 and "#SBATCH" in dry.output
    assert _holders(tmp_path) == []  # $KSCALE_HOME/specs/*.yaml included, written on --dry-run too
    r = _cli(["submit", str(job), "--target", "slurm", "--set", f"cluster.env.HF_TOKEN={SECRET}"])
    assert r.exit_code == 0, r.output
    sid = json.loads(next((home / "submissions").glob("*.json")).read_text())["id"]
    rec = tmp_path / "out.cluster"
    _only_env_file(tmp_path, rec / f"{sid}.env")
    assert all(SECRET not in a for argv in _argv(calls, "sbatch") + _argv(calls, "squeue") for a in argv)
    assert records.read_env_file(rec / f"{sid}.env") == {"HF_HOME": "/shared/hf", "HF_TOKEN": SECRET}


# ----------------------------------------------------------------------------- Ray Jobs API and doctor


class _FakeJobs:
    """What kscale sends to the Jobs API: entrypoint, runtime env and the shipped working dir's files."""

    def __init__(self, probe_line: str = ""):
        self.sent: list[dict] = []
        self.probe_line = probe_line

    def get_job_info(self, sid):
        raise RuntimeError(f"Job {sid} does not exist")

    def submit_job(self, **kw):
        wd = kw.get("runtime_env", {}).get("working_dir")
        files = {str(f.relative_to(wd)): f.read_text() for f in Path(wd).rglob("*") if f.is_file()} if wd else {}
        self.sent.append({**kw, "files": files})
        return kw.get("submission_id") or "probe-1"

    def get_job_status(self, sid):
        return "SUCCEEDED"

    def get_job_logs(self, sid):
        return self.probe_line


def test_ray_jobs_runtime_env_names_the_env_file_only(home, tmp_path, monkeypatch):
    from kscale.targets import ray_jobs

    fake = _FakeJobs()
    monkeypatch.setattr(ray_jobs, "connect", lambda address: (fake, "http://head:8265"))
    job = _job(tmp_path, executor="ray")
    r = _cli(["submit", str(job), "--address", "http://head:8265", "--set", f"cluster.env.HF_TOKEN={SECRET}"])
    assert r.exit_code == 0, r.output
    (sent,) = fake.sent
    assert SECRET not in json.dumps(sent), "the secret went to the Jobs API (runtime env, entrypoint or working dir)"
    env_vars = sent["runtime_env"]["env_vars"]
    assert "HF_TOKEN" not in env_vars and "HF_HOME" not in env_vars
    env_file = Path(env_vars["KSCALE_ENV_FILE"])
    assert sent["runtime_env"]["worker_process_setup_hook"] == "kscale.private.apply_env_file"
    _only_env_file(tmp_path, env_file)

    # The cluster side: the setup hook gives a worker the values; the driver wrapper gives them to the driver.
    monkeypatch.setenv("KSCALE_ENV_FILE", str(env_file))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    from kscale.private import apply_env_file

    apply_env_file()
    assert os.environ["HF_TOKEN"] == SECRET
    monkeypatch.delenv("HF_TOKEN")
    fake_python = tmp_path.parent / f"{tmp_path.name}-python"  # stands in for `python -m kscale.cli submit`: says whether it got it
    fake_python.write_text(f"#!/bin/bash\n[ \"$HF_TOKEN\" = {shlex.quote(SECRET)} ] && echo driver-has-it\n")
    fake_python.chmod(0o755)
    rec = env_file.parent
    code = records.run_driver(str(job), "kscale-sec-driver", "ray", rec, python=str(fake_python))
    assert code == 0 and "driver-has-it" in (rec / "kscale-sec-driver.driver.log").read_text()
    _only_env_file(tmp_path, env_file)


def test_doctor_probe_gets_no_cluster_env(tmp_path, monkeypatch):
    from kscale.targets import ray_jobs
    from kscale.targets.checks import Finding

    probe = {"nodes": [{"host": "h", "cpus": 2, "gpus": 0}], "unplaced": 0, "actors": [], "versions": {}}
    fake = _FakeJobs("KSCALE_PROBE " + json.dumps(probe))
    monkeypatch.setattr(ray_jobs, "connect", lambda address: (fake, address))
    monkeypatch.setattr(ray_jobs, "check_auth", lambda url: [Finding("auth", "ok", "fake")])
    spec = load_spec(_job(tmp_path), check_model=False, overrides=[f"cluster.env.HF_TOKEN={SECRET}"])
    found = ray_jobs.check_cluster(spec, "http://head:8265")
    (sent,) = fake.sent
    assert SECRET not in json.dumps(sent) and not sent["runtime_env"].get("env_vars")
    assert any(f.check == "env" and "HF_TOKEN" in f.message for f in found)


# ----------------------------------------------------------------------------- Kubernetes

KUBECTL = """
args = sys.argv[1:]
if args[:2] == ["get", "crd"]:
    sys.exit(0)
if args[:2] == ["config", "current-context"]:
    print("fake"); sys.exit(0)
if args[:2] == ["get", "rayjob"]:
    sys.exit(1)
if args[:3] == ["apply", "-f", "-"]:  # the Secret, on stdin: kept outside the searched folder
    open(CALLS + "/secrets", "a").write(json.dumps(json.loads(sys.stdin.read())) + "\\n")
print("ok")
"""


def test_k8s_secret_per_submission_values_on_stdin_only_and_deleted_by_stop(home, tmp_path, monkeypatch):
    calls = _fake_bins(tmp_path, monkeypatch, {"kubectl": KUBECTL})
    a = _job(tmp_path, name="same", out="a")
    (tmp_path / "b").mkdir()
    b = _job(tmp_path / "b", name="same", out="out-b")  # the same job name, another output: another submission
    sids = []
    for job in (a, b):
        r = _cli(["submit", str(job), "--target", "k8s", "--set", f"cluster.env.HF_TOKEN={SECRET}"])
        assert r.exit_code == 0, r.output
        sids.append(re.search(r"applied RayJob [^/\s]+/(\S+)", r.output).group(1))
    assert sids[0] != sids[1]
    assert _holders(tmp_path) == []  # manifests, submissions, spec copies
    assert all(SECRET not in w for argv in _argv(calls, "kubectl") for w in argv)
    secrets = [json.loads(line) for line in (calls / "secrets").read_text().splitlines()]
    assert [s["metadata"]["name"] for s in secrets] == [f"{sid}-env" for sid in sids]  # one each, not shared
    assert all(s["kind"] == "Secret" and s["stringData"]["HF_TOKEN"] == SECRET for s in secrets)
    for sid in sids:  # the pods of each job read their own Secret
        manifest = (home / "manifests" / f"{sid}.yaml").read_text()
        assert f"name: {sid}-env" in manifest

    r = _cli(["stop", sids[0]])
    assert r.exit_code == 0, r.output
    deletes = [argv for argv in _argv(calls, "kubectl") if argv[:1] == ["delete"]]
    assert ["delete", "secret", f"{sids[0]}-env", "-n", "default", "--ignore-not-found"] in deletes


def test_k8s_env_with_reuse_cluster_is_refused_naming_cluster_env(tmp_path):
    spec = load_spec(_job(tmp_path, reuse_cluster="shared"), check_model=False)
    with pytest.raises(SpecError) as e:
        k8s.render_rayjob(spec, str(tmp_path / "sec.yaml"), "kscale-sec-0000000000")
    assert e.value.problems[0][0] == "cluster.env" and "shared-env" in e.value.problems[0][1]
    text = k8s.to_yaml([k8s.render_raycluster(spec)])  # the reusable cluster reads its own Secret
    assert "name: shared-env" in text


def test_redacted_overrides_keep_keys_and_drop_values():
    assert records.redact_override(f"cluster.env.HF_TOKEN={SECRET}") == "cluster.env.HF_TOKEN=(secret, not recorded)"
    shown = records.redact_override(f"cluster.env={{A: {SECRET}, B: x}}")
    assert SECRET not in shown and "A" in shown and "B" in shown
    shown = records.redact_override(f"cluster={{python: /p, env: {{A: {SECRET}}}}}")
    assert SECRET not in shown and "/p" in shown
    assert records.redact_override("cluster.env=[unparseable") == "cluster.env=(secret, not recorded)"
    assert records.redact_override("data.n_samples=8") == "data.n_samples=8"
