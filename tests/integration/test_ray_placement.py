"""The Ray executor when Ray cannot place every worker (embedded Ray of 2 CPUs, no GPUs: ``ray_local``).

A worker gets shards only once its constructor returned, so a worker the cluster has no room for holds none
and the run ends with every shard done by the placed ones; with no worker placeable at all the run fails
after ``resources.placement_timeout_s`` naming the resources asked for; a worker whose constructor always
fails ends the run with that error. Each run goes in a thread joined with a timeout: a hang fails the test.
"""

import threading

import pytest

from kscale.data import plan_shards
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec

STAGE = "tests.integration.placement_stage"
HANG_S = 90  # far above a run's few seconds: reaching it means the run hangs


def run_in_thread(spec, shards) -> dict:
    """The executor's run in a thread; its result, or the exception it raised, or a failure on a hang."""
    from kscale.executors.ray import RayExecutor

    out: dict = {}

    def body():
        try:
            out["result"] = RayExecutor(STAGE, show_bar=False).run(spec, shards, skipped=0,
                                                                    progress_dir=spec.output.path)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout=HANG_S)
    if t.is_alive():
        pytest.fail(f"the run did not end within {HANG_S} s (it hangs)")
    return out


def spec_of(tmp_path, name="t", **resources):
    return spec_from_dict(extract_spec(tmp_path, name=name, resources={"executor": "ray", "max_retries": 1,
                                                                         **resources}))


def test_workers_ray_cannot_place_hold_no_shard_and_the_run_ends(tmp_path, ray_local):
    """Three workers of 1 CPU on a 2-CPU Ray: two are placed, the third never is; s000001 fails once and is
    handed out again (to a placed worker: the third would hold it for ever); every shard is done."""
    spec = spec_of(tmp_path, workers=3, cpus_per_worker=1)
    out = run_in_thread(spec, plan_shards(24, 4))
    assert "error" not in out, out
    r = out["result"]
    assert r["state"] == "succeeded" and r["shards_done"] == 6 and r["shards_failed"] == 0, r
    assert r["retries"] == 1, r
    pids = {(tmp_path / "store" / f"attempted-s{i:06d}").read_text() for i in range(6)}
    assert len(pids) <= 2, pids  # two worker processes did all the work


def test_no_placeable_worker_fails_naming_the_resources(tmp_path, ray_local):
    """A worker asks for a GPU that no node has: after the placement timeout the run fails and says which
    fields to change, instead of waiting for ever."""
    spec = spec_of(tmp_path, workers=2, gpus_per_worker=1, placement_timeout_s=3)
    out = run_in_thread(spec, plan_shards(8, 4))
    assert "result" not in out, out
    msg = str(out["error"])
    assert "no Ray worker could be placed" in msg and "resources.gpus_per_worker=1" in msg, msg
    assert "0 GPU" in msg and "resources.placement_timeout_s=3" in msg, msg


def test_a_constructor_that_always_fails_ends_the_run_with_its_error(tmp_path, ray_local):
    """``setup`` raises in every worker: each slot is tried ``max_retries + 1`` times, then the run fails with
    the constructor's error (no shard was ever given out, none is quarantined for it)."""
    spec = spec_of(tmp_path, name="setup-fails", workers=2)
    out = run_in_thread(spec, plan_shards(8, 4))
    assert "result" not in out, out
    msg = str(out["error"])
    assert "no Ray worker could start" in msg and "no such model here" in msg, msg
