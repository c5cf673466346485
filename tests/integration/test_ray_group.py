"""kscale.executors.ray_group on a real local Ray: the actors form one gloo process group (a real
all_gather), each with its own rank and process, and the driver gets rank 0's value; a rank that raises
stops the group and the error names it. The eval stage's end-to-end runs are in test_eval_ray.py (slow)."""

from __future__ import annotations

import os

import pytest

from kscale.executors.ray_group import RankFailed, run_ranks
from kscale.spec import spec_from_dict


def _spec(tmp_path, workers: int = 2):
    return spec_from_dict({"kind": "eval", "name": "group", "model": {"path": "debug:qwen2_5_vl", "device": "cpu"},
                           "eval": {"tasks": ["t"]}, "output": {"path": str(tmp_path / "out")},
                           "resources": {"executor": "ray", "workers": workers, "cpus_per_worker": 1,
                                         "placement_timeout_s": 60}}, check_model=False)


def test_actors_form_one_group_and_the_driver_gets_rank_0s_value(tmp_path, ray_local) -> None:
    rank, world, got = run_ranks(_spec(tmp_path), "tests.integration.group_ranks:gather_pids")
    assert (rank, world) == (0, 2)
    assert [g[0] for g in got] == [0, 1]  # distinct ranks, gathered over gloo
    pids = {g[1] for g in got}
    assert len(pids) == 2 and os.getpid() not in pids  # two actors of their own
    assert {g[2] for g in got} == {"127.0.0.1"}  # one node: the rendezvous on loopback


@pytest.mark.extended  # ~13 s: a Ray group of two ranks; the group's gloo meeting stays in the default suite
def test_a_rank_that_raises_stops_the_group_and_is_named(tmp_path, ray_local) -> None:
    with pytest.raises(RankFailed, match=r"rank 1 of 2 \(Ray actor pid \d+ on .*\) raised ValueError: rank 1 refuses"):
        run_ranks(_spec(tmp_path), "tests.integration.group_ranks:gather_pids", {"fail_rank": 1})
