"""`kscale submit --target slurm` through a real single-node Slurm: the demo job to a finished store."""

from __future__ import annotations

import re
import subprocess
import time

from tests.cluster.helpers import DEMO, clean_env, kscale, own_pids, read_json


def test_demo_through_sbatch_to_a_finished_store(slurm, tmp_path):
    env = clean_env(tmp_path / "home", tmp_path / "kscale-home")
    env["SLURM_CONF"] = slurm["SLURM_CONF"]
    t0 = time.monotonic()
    sub = kscale(["submit", str(DEMO), "--target", "slurm"], env, tmp_path)
    assert sub.returncode == 0, sub.stderr
    m = re.search(r"submitted (kscale-[a-z0-9-]+) as Slurm job (\d+)", sub.stdout)
    assert m, sub.stdout
    sid, job_id = m.groups()

    again = kscale(["submit", str(DEMO), "--target", "slurm"], env, tmp_path)
    assert again.returncode == 0 and "attached" in again.stdout, again.stdout + again.stderr

    logs = kscale(["logs", "-f", sid], env, tmp_path, timeout=300)
    elapsed = time.monotonic() - t0
    assert logs.returncode == 0, logs.stdout[-3000:] + logs.stderr
    assert "kscale: starting Ray head on" in logs.stdout and "2 CPU(s) and 0 GPU(s) per node" in logs.stdout
    assert "ssh -N -L 8265:127.0.0.1:" in logs.stdout  # the dashboard tunnel line
    assert "kscale driver: SUCCEEDED" in logs.stdout

    store = tmp_path / "runs" / "demo" / "keys"
    assert len(list((store / "shards").glob("*.done.json"))) == 8
    rec = tmp_path / "runs" / "demo" / "keys.cluster"
    assert read_json(rec / f"{sid}.state.json")["state"] == "SUCCEEDED"
    assert list((rec / "ray-logs" / sid).glob("*/raylet.out")), "every node's Ray logs are kept beside the outputs"
    info = read_json(rec / f"{sid}.slurm.json")
    assert info["gcs_port"] >= 20000 and info["slurm_job_id"] == job_id

    status = kscale(["status", sid], env, tmp_path)
    assert "driver    SUCCEEDED" in status.stdout and "shards 8/8" in status.stdout, status.stdout

    # Only our own processes were stopped, and all of them: nothing runs from the job's node temp dir.
    node_tmp = f"/tmp/kscale-kscaleci-{job_id}"
    deadline = time.monotonic() + 30
    while own_pids(node_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not own_pids(node_tmp)
    st = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in st, st
    print(f"\nMEASURED slurm: submit->driver done (logs -f returned) {elapsed:.1f} s")
