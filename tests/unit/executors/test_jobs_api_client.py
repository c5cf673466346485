"""Ray Jobs API client pieces that need no cluster: ids, addresses, tokens, shipped spec, log following,
and the driver wrapper's records. (The real head is exercised in tests/cluster/test_jobs_api.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kscale.targets import ray_jobs as jobs
from kscale.targets import records
from kscale.spec import spec_from_dict


def _spec(tmp_path: Path, name: str = "My Job!", n: int = 64, out: str | None = None):
    return spec_from_dict({"kind": "extract", "name": name, "model": {"path": "debug:qwen2_5_vl"},
                           "data": {"generated": {"n_samples": n}},
                           "output": {"path": out or str(tmp_path / "keys")}}, check_model=False)


def test_submission_id_is_stable_short_and_dns_safe(tmp_path):
    a, b = records.submission_id(_spec(tmp_path)), records.submission_id(_spec(tmp_path))
    assert a == b and a.startswith("kscale-my-job-")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 47
    assert records.submission_id(_spec(tmp_path, n=65)) != a            # another spec, another job
    assert records.submission_id(_spec(tmp_path, out=str(tmp_path / "other"))) != a  # another output, too
    forced = records.submission_id(_spec(tmp_path, name="x" * 80), force=True)
    assert forced != records.submission_id(_spec(tmp_path, name="x" * 80)) and len(forced) <= 47


@pytest.mark.parametrize("text, expected", [("Demo", "demo"), ("7b run", "j-7b-run"), ("--", "j"),
                                            ("a_b.c", "a-b-c")])
def test_slug(text, expected):
    assert records.slug(text) == expected


def test_address_flag_beats_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert jobs.resolve_address("head:8265") == "http://head:8265"
    assert jobs.resolve_address(None) == "http://env:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265/")
    assert jobs.resolve_address(None) == "http://api:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address for drivers, not the Jobs API
    with pytest.raises(jobs.JobsError, match="--address"):
        jobs.resolve_address(None)


def test_token_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert jobs.read_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert jobs.read_token() == "home-token"
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobs.read_token() == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.read_token() == "env-token"


def test_unreachable_cluster_is_a_clear_error():
    with pytest.raises(jobs.JobsError, match="cannot reach the Ray Jobs API at http://127.0.0.1:1"):
        jobs.connect("http://127.0.0.1:1")


def test_shipped_spec_has_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"kind": "extract", "model": {"path": "debug:llava"},
                                   "data": {"source": "manifest", "path": "data.jsonl"},
                                   "output": {"path": "runs/x"}}))
    shipped = yaml.safe_load(records.absolute_spec_yaml(str(job)))
    assert shipped["output"]["path"] == str(tmp_path / "runs" / "x")
    assert shipped["data"]["path"] == str(tmp_path / "data.jsonl")
    assert shipped["model"]["path"] == "debug:llava"


class FlakyClient:
    """Answers like JobSubmissionClient; the connection drops twice mid-run (as through a proxy)."""

    def __init__(self):
        self.calls = 0
        self.script = [("RUNNING", "a\n"), "drop", ("RUNNING", "a\nb\n"), "drop", ("SUCCEEDED", "a\nb\nc\n")]

    def _step(self):
        item = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if item == "drop":
            raise ConnectionError("connection reset by peer")
        return item

    def get_job_status(self, sid):
        self._now = self._step()
        return self._now[0]

    def get_job_logs(self, sid):
        return self._now[1]


def test_follow_reconnects_and_prints_each_line_once():
    out: list[str] = []
    final = jobs.follow_logs(FlakyClient(), "id", out.append, follow=True, poll_s=0.01)
    assert final == "SUCCEEDED" and "".join(out) == "a\nb\nc\n"


def test_driver_wrapper_tees_the_log_and_records_the_state(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: extract\nbogus: 1\n")
    rec = tmp_path / "rec"
    p = subprocess.run([sys.executable, "-m", "kscale.targets.records", "driver", "--id", "kscale-t-1",
                        "--target", "slurm", "--record-dir", str(rec), str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2  # kscale submit's exit code for a bad spec, passed through
    state = records.read_json(rec / "kscale-t-1.state.json")
    assert state["state"] == "FAILED" and state["exit_code"] == 2 and state["target"] == "slurm"
    log = (rec / "kscale-t-1.driver.log").read_text()
    assert "bogus: unknown key" in log and "bogus: unknown key" in p.stdout
    assert (rec / "kscale-t-1.job.yaml").read_text() == bad.read_text()


def test_record_dir_is_a_sibling_of_the_output(tmp_path):
    spec = _spec(tmp_path)
    assert records.record_dir(spec) == tmp_path / "keys.cluster"
    line = records.format_progress({"stage": "extract", "job": "demo", "state": "running", "shards_total": 8,
                                           "shards_done": 3, "shards_skipped": 2, "shards_failed": 1,
                                           "samples": 24, "samples_per_s": 2.5, "bytes": 2_000_000})
    assert line == "extract demo: running, shards 6/8 (2 skipped, 1 failed), 24 samples (2.5/s), 2.00 MB"


def test_status_line_shows_shards_per_node_lost_nodes_and_replaced_workers(tmp_path):
    """A multi-node Ray run's snapshot (executors.progress: ``nodes``, ``replaced_actors``) in `kscale status`."""
    import json

    from kscale.executors.progress import Progress

    prog = Progress(str(tmp_path), "demo", "extract", total=5, skipped=0, show_bar=False)
    a, b = "a" * 56, "b" * 56
    for i, node in enumerate([a, b, a, a]):
        prog.shard_done({"shard": f"s{i:06d}", "n_samples_ok": 2}, node)
    prog.actor_replaced(b, node_alive=False)
    prog.shard_done({"shard": "s000004", "n_samples_ok": 2}, a)
    snap = prog.finish()
    assert snap["nodes"] == {a: {"shards_done": 4, "actors_lost": 0, "node_lost": False},
                             b: {"shards_done": 1, "actors_lost": 1, "node_lost": True}}
    assert snap["shard_nodes"] == {"s000000": a, "s000001": b, "s000002": a, "s000003": a, "s000004": a}
    line = records.format_progress({k: v for k, v in snap.items() if k != "updated_at"})
    assert line.endswith("; 2 nodes (1 lost): aaaaaaaa 4 shards, bbbbbbbb 1 shard (lost, 1 worker lost), "
                         "1 worker replaced"), line
    running = json.loads((tmp_path / "_progress.json").read_text())
    assert "nodes" in running and "shard_nodes" in running  # the final write carries the shard -> node map
    local = Progress(str(tmp_path / "local"), "demo", "extract", total=1, skipped=0, show_bar=False)
    local.shard_done({"shard": "s000000"})
    assert "nodes" not in local.finish() and "node" not in records.format_progress(local.finish())
