"""Executors on a stage that fails on purpose: retries, quarantine, exit status, progress file."""

import json
from pathlib import Path


from kscale.data import plan_shards
from kscale.executors.local import LocalExecutor
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec


def run(executor, tmp_path):
    spec = spec_from_dict(extract_spec(tmp_path, resources={"executor": "local", "max_retries": 2}))
    shards = plan_shards(20, 4)
    return spec, executor.run(spec, shards, skipped=0, progress_dir=spec.output.path)


def check(spec, result):
    assert result["state"] == "failed"
    assert result["shards_done"] == 4 and result["shards_failed"] == 1 and result["retries"] == 3
    assert "boom in s000001" in result["quarantined"]["s000001"]
    out = Path(spec.output.path)
    failed = json.loads((out / "shards" / "s000001.failed.json").read_text())
    assert failed["attempts"] == 3 and "boom" in failed["error"]
    assert json.loads((out / "_progress.json").read_text())["state"] == "failed"
    assert result["samples"] == 16


def test_local_executor_retries_and_quarantines(tmp_path):
    check(*run(LocalExecutor("tests.integration.flaky_stage", show_bar=False), tmp_path))


def test_local_executor_overlaps_commits_and_reports_after_them(tmp_path):
    """Shard k+1 starts while k commits; retries and quarantine are those of the synchronous stage."""
    spec, result = run(LocalExecutor("tests.integration.flaky_pipelined_stage", show_bar=False), tmp_path)
    check(spec, result)
    out = Path(spec.output.path)
    assert (out / "overlapped-s000001").exists()  # s000000 committed while s000001 started
    done = {p.name[: -len(".done")] for p in out.glob("*.done")}
    assert done == {"s000000", "s000002", "s000003", "s000004"}  # a failed commit leaves no marker


def test_ray_executor_retries_and_quarantines(tmp_path, ray_local):
    from kscale.executors.ray import RayExecutor

    spec = spec_from_dict(extract_spec(tmp_path, resources={"executor": "ray", "workers": 2, "max_retries": 2}))
    result = RayExecutor("tests.integration.flaky_stage", show_bar=False).run(
        spec, plan_shards(20, 4), skipped=0, progress_dir=spec.output.path)
    check(spec, result)


def test_ray_actors_overlap_commits_and_report_after_them(tmp_path, ray_local):
    """On a Ray actor too, shard k+1 starts while k commits; k is reported only after its commit, so a
    failed background commit fails (and retries, then quarantines) that shard, never reports it done."""
    from kscale.executors.ray import RayExecutor

    spec = spec_from_dict(extract_spec(tmp_path, resources={"executor": "ray", "workers": 1, "max_retries": 2}))
    result = RayExecutor("tests.integration.flaky_pipelined_stage", show_bar=False).run(
        spec, plan_shards(20, 4), skipped=0, progress_dir=spec.output.path)
    check(spec, result)
    out = Path(spec.output.path)
    assert (out / "overlapped-s000001").exists()  # s000000 committed while s000001 started, on the actor
    done = {p.name[: -len(".done")] for p in out.glob("*.done")}
    assert done == {"s000000", "s000002", "s000003", "s000004"}  # a failed commit leaves no marker


def test_cli_exit_code_on_quarantine(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import kscale.extract.run
    from kscale.cli import main

    monkeypatch.setattr(kscale.extract.run, "WORKER_MODULE", "tests.integration.flaky_stage")
    import yaml

    d = extract_spec(tmp_path, data={"generated": {"n_samples": 8, "image_size": 56}})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["submit", "--no-progress", str(job)])
    assert r.exit_code == 1, r.output
    assert "1 failed" in r.output and "quarantined s000001" in r.output
