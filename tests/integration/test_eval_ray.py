"""The eval stage on Ray: ``resources.workers`` actors as the ranks of one process group (kscale.eval.launch).

On an embedded Ray of 2 CPUs with the tiny local lmms-eval task of test_eval.py: two actors form a real
gloo group (lmms-eval's own gathers run over it), each answers every other document of the task -- each
document exactly once -- from a process of its own, and the run directory rank 0 writes equals the
one-process run's (scores.json, every choice's score). A rank killed by PID mid-run fails the stage naming
the variant being evaluated, and a rerun resumes from the run files already written.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.integration.test_eval import TASK, colour_task  # noqa: F401 - colour_task is a fixture used here
from tests.testing_utils import require_module

require_module("lmms_eval", install="pip install -e '.[eval]' && pip install --no-deps lmms-eval==0.7.3")


def _raw(qwen_dir: str, task_dir, out: Path, variants: list[str], executor: str = "ray") -> dict:
    return {"kind": "eval", "name": "evalray", "model": {"path": qwen_dir, "device": "cpu", "dtype": "float32"},
            "eval": {"tasks": [TASK], "include_path": [str(task_dir)], "batch_size": 6, "bootstrap_iters": 100,
                     "blind": False, "variants": [{"name": v} for v in variants]},
            "output": {"path": str(out)},
            "resources": {"executor": executor, "workers": 2, "cpus_per_worker": 1, "placement_timeout_s": 120}}


def _run(raw: dict):
    from kscale.runner import run_job
    from kscale.spec import spec_from_dict

    return run_job(spec_from_dict(raw), show_bar=False, dashboard=False)


@pytest.fixture(scope="module")
def one_process(qwen_dir, colour_task, tmp_path_factory) -> Path:  # noqa: F811
    """The same job in this process (resources.executor: local): the reference run directory."""
    out = tmp_path_factory.mktemp("one") / "eval"
    _run(_raw(qwen_dir, colour_task[0], out, ["base"], executor="local"))
    return out


def _nll(run: Path) -> np.ndarray:
    rows = pd.read_csv(run / "samples.csv").sort_values("doc_id")
    assert list(rows.doc_id) == sorted(set(rows.doc_id)), "a document answered twice"
    return np.array([json.loads(c) for c in rows.choice_nll])


@pytest.mark.slow  # an embedded Ray, two actors importing lmms-eval and loading the model, and the local run
def test_ray_ranks_answer_each_document_once_and_equal_the_one_process_run(
        ray_local, qwen_dir, colour_task, one_process, tmp_path) -> None:  # noqa: F811
    task_dir, docs = colour_task
    out = tmp_path / "eval"
    result = _run(_raw(qwen_dir, task_dir, out, ["base"]))
    run = json.loads((out / "runs" / "base.json").read_text())
    shards = [sorted(d for t, d in shard if t == TASK) for shard in run["kscale_shards"]]
    assert len(shards) == 2 and all(shards)
    assert sorted(shards[0] + shards[1]) == list(range(len(docs)))  # every document exactly once
    assert shards == [list(range(0, len(docs), 2)), list(range(1, len(docs), 2))]  # lmms-eval's rank::2 split
    workers = run["kscale_workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids  # two actors of their own, not the driver
    # the run directory rank 0 wrote equals the one-process run's
    one, two = (json.loads((r / "scores.json").read_text()) for r in (one_process, out))
    assert len(one) == len(two) == 1 and one[0].keys() == two[0].keys()
    for key, want in one[0].items():
        assert two[0][key] == (pytest.approx(want, abs=1e-12) if isinstance(want, float) else want), key
    np.testing.assert_allclose(_nll(out), _nll(one_process), atol=1e-5, rtol=0)
    assert result.rows == two and Path(result.run_dir) == out
    assert json.loads((out / "result.json").read_text())["rows"] == two  # the driver wrote the result as locally
    assert (out / "report.html").is_file()


def _kill_rank_once_written(run_file: Path, rank: int, killed: list[int], stop: threading.Event) -> None:
    """Once ``run_file`` exists, SIGKILL the actor that answered as ``rank`` (its PID is recorded there)."""
    while not stop.is_set():
        if run_file.is_file():
            pid = json.loads(run_file.read_text())["kscale_workers"][rank]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


@pytest.mark.slow  # two Ray runs of two actors each, one with a rank killed
def test_a_killed_rank_fails_naming_the_variant_and_a_rerun_resumes(
        ray_local, qwen_dir, colour_task, one_process, tmp_path) -> None:  # noqa: F811
    from kscale.eval.launch import EvalRankFailed

    task_dir, _ = colour_task
    out = tmp_path / "eval"
    raw = _raw(qwen_dir, task_dir, out, ["base", "again"])
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_rank_once_written, args=(out / "runs" / "base.json", 1, killed, stop))
    killer.start()
    try:
        with pytest.raises(EvalRankFailed) as e:
            _run(raw)
    finally:
        stop.set()
        killer.join()
    msg = str(e.value)
    assert killed, "the first variant's run file never appeared"
    assert f"rank 1 of 2 (Ray actor pid {killed[0]}" in msg and "died" in msg, msg
    assert f"while evaluating variant 'again' (with the image) on tasks {TASK}" in msg, msg
    assert "base.json" in msg and "resume" in msg, msg
    first = (out / "runs" / "base.json").read_bytes()
    stamp = (out / "runs" / "base.json").stat().st_mtime_ns
    assert not (out / "runs" / "again.json").exists()

    _run(raw)  # output.if_exists: resume (the default): only the missing variant runs
    assert (out / "runs" / "base.json").read_bytes() == first
    assert (out / "runs" / "base.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "runs" / "again.json").read_text())
    assert killed[0] not in {w["pid"] for w in again["kscale_workers"]}  # new actors
    rows = {r["variant"]: r for r in json.loads((out / "scores.json").read_text())}
    want = json.loads((one_process / "scores.json").read_text())[0]
    assert set(rows) == {"base", "again"}
    for name in rows:
        assert rows[name]["score"] == pytest.approx(want["score"], abs=1e-12), name
        assert rows[name]["stderr"] == pytest.approx(want["stderr"], abs=1e-12), name
