"""`kscale submit --address` against a real Ray head started by the test: run, attach, logs, status, stop."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.helpers import DEMO, kscale, read_json


def _sid(stdout: str) -> str:
    m = re.search(r"(kscale-[a-z0-9-]+)", stdout)
    assert m, stdout
    return m.group(1)


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_demo_runs_attaches_logs_and_status(ray_head, tmp_path):
    t0 = time.monotonic()
    first = kscale(["submit", str(DEMO), "--address", ray_head.url], ray_head.env, tmp_path)
    submit_s = time.monotonic() - t0
    assert first.returncode == 0, first.stderr
    sid = _sid(first.stdout)
    assert "submitted" in first.stdout

    second = kscale(["submit", str(DEMO), "--address", ray_head.url], ray_head.env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "attached" in second.stdout and sid in second.stdout

    shards = tmp_path / "runs" / "demo" / "keys" / "shards"
    _wait_for(lambda: list(shards.glob("*.done.json")), 180, "the first committed shard")
    first_shard_s = time.monotonic() - t0

    logs = kscale(["logs", "-f", sid, "--address", ray_head.url], ray_head.env, tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "kscale driver: SUCCEEDED" in logs.stdout and "extract succeeded" in logs.stdout
    total_s = time.monotonic() - t0
    assert len(list(shards.glob("*.done.json"))) == 8  # 64 samples / shard_size 8

    from ray.job_submission import JobSubmissionClient

    token = (Path(ray_head.env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(ray_head.url, headers={"Authorization": f"Bearer {token}"})
    assert [j.submission_id for j in client.list_jobs()].count(sid) == 1  # the second submit made no duplicate

    status = kscale(["status", sid], ray_head.env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert "cluster   SUCCEEDED" in status.stdout and "shards 8/8" in status.stdout

    # The records beside the outputs answer without the cluster: the driver log and its state.
    rec = tmp_path / "runs" / "demo" / "keys.cluster"
    assert read_json(rec / f"{sid}.state.json")["state"] == "SUCCEEDED"
    offline = kscale(["logs", str(tmp_path / "runs" / "demo" / "keys")], ray_head.env, tmp_path)
    assert "extract succeeded" in offline.stdout
    print(f"\nMEASURED jobs-api: head start {ray_head.start_s:.1f} s, submit {submit_s:.2f} s, "
          f"submit->first shard {first_shard_s:.1f} s, submit->logs complete {total_s:.1f} s")


def test_stop_stops_the_driver(ray_head, tmp_path):
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["generated"]["n_samples"] = 2048  # long enough to be stopped mid-run
    spec["output"]["path"] = "runs/stop/keys"
    job = tmp_path / "long.yaml"
    job.write_text(yaml.safe_dump(spec))
    sub = kscale(["submit", str(job), "--address", ray_head.url], ray_head.env, tmp_path)
    assert sub.returncode == 0, sub.stderr
    sid = _sid(sub.stdout)
    rec = tmp_path / "runs" / "stop" / "keys.cluster"
    _wait_for(lambda: (read_json(rec / f"{sid}.state.json") or {}).get("state") == "RUNNING", 120, "the driver")
    stopped = kscale(["stop", sid], ray_head.env, tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert "STOPPED" in stopped.stdout
    state = _wait_for(lambda: (read_json(rec / f"{sid}.state.json") or {}).get("state") != "RUNNING" and
                      read_json(rec / f"{sid}.state.json"), 30, "the driver's final state")
    assert state["state"] == "STOPPED"  # the wrapper saw the signal and passed it on
    assert len(list((tmp_path / "runs" / "stop" / "keys" / "shards").glob("*.done.json"))) < 2048 // 8


def test_missing_token_is_reported_with_a_fix(ray_head, tmp_path):
    env = {**ray_head.env, "HOME": str(tmp_path)}  # a HOME without ~/.ray/auth_token
    r = kscale(["status", "kscale-nothing-0000000000", "--address", ray_head.url], env, tmp_path)
    assert "requires token authentication" in r.stdout + r.stderr
    assert "ray get-auth-token" in r.stdout + r.stderr


@pytest.mark.slow  # ~15 s: a probe job with one actor per worker
def test_doctor_probes_the_cluster(ray_head, tmp_path):
    r = kscale(["doctor", str(DEMO), "--address", ray_head.url], ray_head.env, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "requires a token; ours is accepted" in r.stdout
    assert "2 actor(s) placed" in r.stdout
    assert "(on the cluster)" in r.stdout


def test_cluster_env_reaches_driver_and_workers_through_the_env_file(ray_head, tmp_path):
    """Issue 21 item 3 on a real head: a `cluster.env` value given with --set is in no runtime env, log or
    file but the run's 0600 env file, and Ray workers of a job with kscale's runtime env get it (the
    worker setup hook reads that file)."""
    import hashlib
    import json
    import os
    import shlex

    from ray.job_submission import JobSubmissionClient

    from kscale.spec import load_spec
    from kscale.targets.ray_jobs import runtime_env

    secret = "s3cret-" + os.urandom(6).hex()
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["generated"]["n_samples"] = 8  # one shard
    spec["output"]["path"] = "runs/env/keys"
    job = tmp_path / "env.yaml"
    job.write_text(yaml.safe_dump(spec))
    setting = f"cluster.env.KSCALE_TEST_SECRET={secret}"
    sub = kscale(["submit", str(job), "--address", ray_head.url, "--set", setting], ray_head.env, tmp_path)
    assert sub.returncode == 0, sub.stderr
    sid = _sid(sub.stdout)
    logs = kscale(["logs", "-f", sid, "--address", ray_head.url], ray_head.env, tmp_path)
    assert "kscale driver: SUCCEEDED" in logs.stdout, logs.stdout[-3000:] + logs.stderr[-3000:]

    token = (Path(ray_head.env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(ray_head.url, headers={"Authorization": f"Bearer {token}"})
    info = client.get_job_info(sid)
    assert secret not in json.dumps(info.runtime_env) + json.dumps(info.entrypoint) + client.get_job_logs(sid)
    rec = tmp_path / "runs" / "env" / "keys.cluster"
    env_file = Path(info.runtime_env["env_vars"]["KSCALE_ENV_FILE"])
    assert env_file == rec / f"{sid}.env" and (env_file.stat().st_mode & 0o777) == 0o600
    searched = [tmp_path, Path(ray_head.env["KSCALE_HOME"])]
    holders = [f for root in searched for f in root.rglob("*") if f.is_file() and not f.is_symlink()
               and secret.encode() in f.read_bytes()]
    assert holders == [env_file]

    # Workers: a job with the runtime env kscale gives its jobs reports a hash of what a worker sees.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    rt = runtime_env(load_spec(job, check_model=False, overrides=[setting]), str(pkg), sid, str(rec))
    probe = ("import hashlib, os, ray\nray.init()\n@ray.remote\ndef seen():\n"
             "    return hashlib.sha256(os.environ.get('KSCALE_TEST_SECRET', '').encode()).hexdigest()\n"
             "print('KSCALE_ENV_CHECK', ray.get(seen.remote()), flush=True)\n")
    probe_id = client.submit_job(entrypoint=f"python -c {shlex.quote(probe)}", runtime_env=rt)
    _wait_for(lambda: str(client.get_job_status(probe_id)) in ("JobStatus.SUCCEEDED", "JobStatus.FAILED",
                                                               "SUCCEEDED", "FAILED"), 180, "the probe job")
    out = client.get_job_logs(probe_id)
    assert f"KSCALE_ENV_CHECK {hashlib.sha256(secret.encode()).hexdigest()}" in out, out[-3000:]
