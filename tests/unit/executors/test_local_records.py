"""Local run records without running a job: the pid check of `kscale stop`, a no-op rerun's progress,
`--set` parsing, and the JSON Schema against the shipped jobs."""

from __future__ import annotations

import glob
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kscale.executors.progress import Progress
from tests.testing_utils import require_module
from kscale.targets.local import LocalTarget, pid_start_time
from kscale.targets.records import Run

REPO = Path(__file__).resolve().parents[3]


def _state(tmp_path: Path, pid: int, start: str | None) -> Run:
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "r.state.json").write_text(json.dumps({"state": "RUNNING", "pid": pid, "pid_start": start,
                                                  "host": socket.gethostname()}))
    return Run("r", {"target": "local"}, None, rec)


def test_stop_never_signals_a_reused_pid(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = _state(tmp_path, proc.pid, "12345")  # recorded start time of another process with that pid
        said = []
        assert LocalTarget().stop(run, None, said.append)
        assert "gone; nothing to stop" in said[0] and proc.poll() is None
        assert LocalTarget().status(run, None)["status"] == "DIED"
        (run.rec_dir / "r.state.json").write_text(json.dumps({"state": "RUNNING", "pid": proc.pid,
                                                              "pid_start": pid_start_time(proc.pid),
                                                              "host": socket.gethostname()}))
        assert LocalTarget().status(run, None)["status"] == "RUNNING"
        LocalTarget().stop(run, None, said.append)
        assert proc.wait(timeout=10) == -15
    finally:
        proc.kill()


def test_noop_rerun_keeps_the_last_real_counts(tmp_path):
    p = Progress(str(tmp_path), "j", "extract", total=2, skipped=0, show_bar=False)
    for _ in range(2):
        p.shard_done({"n_samples_ok": 4, "key_bytes": 1000, "tokens": {"image": 10}})
    first = p.finish()
    again = Progress(str(tmp_path), "j", "extract", total=2, skipped=2, show_bar=False).finish()
    assert again["samples"] == first["samples"] == 8 and again["bytes"] == 2000 and again["tokens"] == {"image": 20}
    assert again["shards_skipped"] == 2 and again["shards_done"] == 0 and again["state"] == "succeeded"
    on_disk = json.loads((tmp_path / "_progress.json").read_text())
    assert on_disk["samples"] == 8


def test_stopped_count_trusts_the_markers_over_the_progress_snapshot(tmp_path):
    """A shard committed on a worker while the driver stopped is on disk but not in ``_progress.json``."""
    from kscale.store.layout import marker_path
    from kscale.targets.local import shards_line

    (tmp_path / "shards").mkdir()
    for i in range(4):
        marker_path(tmp_path, f"s{i:06d}").write_text("{}")
    snapshot = {"shards_total": 12, "shards_done": 2, "shards_skipped": 1}
    assert shards_line(snapshot) == "3 of 12 shards committed"
    assert shards_line(snapshot, str(tmp_path)) == "4 of 12 shards committed"
    assert shards_line(snapshot, str(tmp_path / "not-a-store")) == "3 of 12 shards committed"


def test_overrides_are_typed_and_validated(tmp_path):
    from kscale.spec import SpecError, load_spec

    job = REPO / "jobs" / "demo.yaml"
    spec = load_spec(job, check_model=False, overrides=("data.generated.n_samples=8", "extract.layers=[0, 1]",
                                                        "resources.executor=local", "name=x"))
    assert spec.data.generated.n_samples == 8 and spec.extract.layers == [0, 1] and spec.name == "x"
    with pytest.raises(SpecError) as e:
        load_spec(job, check_model=False, overrides=("data.shard_size=zero", "bad", "resources.nope=1"))
    fields = [f for f, _ in e.value.problems]
    assert "--set" in fields and "data.shard_size" in fields and any("nope" in f for f in fields)


def test_schema_validates_the_shipped_jobs_and_rejects_unknown_keys():
    jsonschema = require_module("jsonschema", install="pip install -e '.[dev]'")
    from kscale.spec_schema import json_schema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    jobs = sorted(glob.glob(str(REPO / "jobs" / "*.yaml"))) + [str(REPO / "cluster" / "example-job.yaml")]
    assert len(jobs) >= 5
    for f in jobs:
        errors = [e.message for e in v.iter_errors(yaml.safe_load(Path(f).read_text()))]
        assert not errors, (f, errors[:3])
    bad = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    bad["extract"]["dtyp"] = "float16"
    bad["resources"]["executor"] = "slurm"
    assert len(list(v.iter_errors(bad))) >= 2
