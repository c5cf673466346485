"""ZeRO-3 checkpoint resume (1 process, the tiny debug model): the rerun restores the partitioned adapter
and the optimizer state, and continues on the uninterrupted curve.

``test_train_deepspeed.py`` kills a ZeRO-2 run mid-way; ZeRO-3 saves and loads each parameter as a
partition (``zero_pp_rank_*`` files, a different load path in DeepSpeed), so it gets its own check. The crash
is made deterministic instead of timed: a finished 6-step run (checkpoints at steps 3 and 6) is put back to
the state a crash after step 4 leaves (``latest`` naming step 3, no step-6 checkpoint, step 4 logged), and
rerun. The first run is the reference: steps 4-6 must come out with its losses (a restore that dropped the
adapter or Adam's moments would drift), and steps 1-3 must stay the first run's lines, wall times included
(a rerun that started over would rewrite them).
"""

from __future__ import annotations

import json
import shutil

import torch

from tests.integration.test_train_deepspeed import _generated, _raw_spec, _run_output
from tests.integration.test_train_deepspeed import model_dir  # noqa: F401  (the module-scoped fixture)
from tests.testing_utils import require_module

require_module("deepspeed", install="pip install -e '.[train]'")


def test_zero3_resume_restores_the_partitioned_state_and_continues_the_curve(model_dir, tmp_path) -> None:  # noqa: F811
    run_dir = tmp_path / "zero3"
    raw = _raw_spec(model_dir, run_dir, _generated(), max_steps=6, checkpoint_every=3, keep_checkpoints=2,
                    deepspeed={"zero_stage": 3})
    _run_output(raw, run_dir)
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000003", "step00000006"]
    assert any("zero_pp_rank_0" in p.name for p in (ckpt / "step00000003").iterdir())  # a ZeRO-3 partition
    first = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in first] == [1, 2, 3, 4, 5, 6]

    # the state a crash during step 5 leaves: step 4 logged, the newest checkpoint is step 3
    shutil.rmtree(ckpt / "step00000006")
    (ckpt / "latest").write_text("step00000003")
    (run_dir / "metrics.jsonl").write_text("\n".join(first[:4]) + "\n")

    out = _run_output(raw, run_dir)
    assert "resumed from step 3" in out, out[-4000:]
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3, 4, 5, 6]  # each step once, in order
    assert after[:3] == first[:3]  # not recomputed: the first run's lines, wall times included
    assert after[3:] != first[3:]  # steps 4-6 were run again (their wall times differ)
    losses = [json.loads(line)["loss"] for line in after]
    reference = [json.loads(line)["loss"] for line in first]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)
    assert reference[-1] != reference[2]  # the curve moves after the checkpoint: the comparison means something
