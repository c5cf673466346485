"""Issue 21 item 2: no file DeepSpeed reads on resume can run code, on any of its load paths.

A real DeepSpeed engine (a tiny module, one CPU process, in a child Python) trains a step and saves a
checkpoint through kscale (:func:`kscale.train.engine.save_checkpoint`); DeepSpeed's own
``ds_to_universal`` turns it into a universal checkpoint. Both load back through
:func:`kscale.train.engine.load_latest_checkpoint` (the universal one into an engine built with
``checkpoint.load_universal``, which the spec refuses, built here past the spec on purpose: the loading must
be weights-only even where that reader is reached). Then each ``.pt`` file of each checkpoint in turn is
replaced by a pickle whose unpickling creates a marker file, the others kept genuine, so the load gets as far
as that file: the model states and the ZeRO partition read through DeepSpeed's checkpoint engine, and the
universal checkpoint's ``zero/optimizer_state.pt`` and per-parameter ``zero/<name>/*.pt`` that
``base_optimizer`` (ZeRO-2), ``stage3`` (ZeRO-3) and ``universal_checkpoint`` read with
``torch.load(weights_only=False)``. Every one must be refused naming that file, and the marker must not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kscale.spec import SpecError, load_spec, spec_from_dict
from tests.testing_utils import require_module

REPO = Path(__file__).resolve().parents[3]

CHILD = """
import dataclasses, json, os, shutil, sys, torch
from pathlib import Path
from kscale.spec import spec_from_dict
from kscale.train import engine as E
from kscale.train.layout import checkpoint_tag
from kscale.train.safe_load import UnsafeCheckpoint

run, stage = Path(sys.argv[1]), int(sys.argv[2])
marker = run.parent / "PWNED"
cfg = spec_from_dict({"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {},
                      "output": {"path": str(run)}, "train": {"deepspeed": {"zero_stage": stage, "bf16": False}}},
                     check_model=False).train
universal = dataclasses.replace(cfg, deepspeed=dataclasses.replace(
    cfg.deepspeed, extra={"checkpoint": {"load_universal": True}}))  # past the spec, on purpose


def build(train_cfg):
    torch.manual_seed(0)
    return E.build_engine(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), train_cfg, 1)


E.ensure_process_group(torch.device("cpu"))
engine = build(cfg)
loss = engine(torch.randn(cfg.micro_batch_size, 4)).sum()
engine.backward(loss)
engine.step()
E.save_checkpoint(engine, run, 3, 2)
ckpt = run / "checkpoints"

from deepspeed.checkpoint import ds_to_universal
sys.argv = ["ds_to_universal", "--input_folder", str(ckpt / checkpoint_tag(3)), "--output_folder",
            str(ckpt / checkpoint_tag(4)), "--num_extract_workers", "1", "--num_merge_workers", "1",
            "--inject_missing_state"]
ds_to_universal.main(ds_to_universal.parse_arguments())
engine_u = build(universal)


class Payload:  # unpickling this runs os.system: what a planted checkpoint file would do
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))


def load(eng, tag):
    (ckpt / "latest").write_text(tag)
    try:
        return E.load_latest_checkpoint(eng, run)
    except UnsafeCheckpoint as e:
        return "refused: " + str(e)
    except Exception as e:  # DeepSpeed choking on what a payload returned: the payload ran
        return f"error: {type(e).__name__}: {e}"


out = {"genuine": load(engine, checkpoint_tag(3)), "genuine_universal": load(engine_u, checkpoint_tag(4)),
       "planted": {}}
step = 10
for source, eng, kind in ((3, engine, "zero"), (4, engine_u, "universal")):
    folder = ckpt / checkpoint_tag(source)
    for f in sorted(folder.rglob("*.pt")):
        rel = str(f.relative_to(folder))
        step += 1
        evil = ckpt / checkpoint_tag(step)
        shutil.copytree(folder, evil)
        torch.save({"state": Payload()}, evil / rel)  # this one file planted, the others genuine
        out["planted"][f"{kind}:{rel}"] = load(eng, checkpoint_tag(step))
out["pwned"] = marker.exists()
print(json.dumps(out))
"""


def _planted_resume(tmp_path: Path, stage: int) -> dict:
    require_module("deepspeed", install="pip install -e '.[train]'")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path / "run"), str(stage)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_every_planted_file_refused(out: dict, model_states: str) -> None:
    assert out["genuine"] == 3 and out["genuine_universal"] == 3  # both checkpoints load, weights only
    planted = out["planted"]
    zero = {k for k in planted if k.startswith("zero:")}
    uni = {k for k in planted if k.startswith("universal:")}
    # the paths DeepSpeed reads on resume: both are there to plant in
    assert {f"zero:{model_states}", f"universal:{model_states}", "universal:zero/optimizer_state.pt"} <= planted.keys()
    assert any("optim_states" in k for k in zero), zero
    for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
        assert sum(k.endswith("/" + name) for k in uni) == 4, uni  # 2 weights, 2 biases
    for key, result in planted.items():
        rel = key.split(":", 1)[1]
        assert result.startswith("refused: checkpoint") and "not loadable as weights only" in result, (key, result)
        assert rel in result and "posix.system" in result, (key, result)  # names the file and what it asked for
    assert out["pwned"] is False


def test_zero2_resume_refuses_a_planted_file_on_every_load_path(tmp_path) -> None:
    _assert_every_planted_file_refused(_planted_resume(tmp_path, 2), "mp_rank_00_model_states.pt")


def test_zero3_resume_refuses_a_planted_file_on_every_load_path(tmp_path) -> None:
    _assert_every_planted_file_refused(_planted_resume(tmp_path, 3), "zero_pp_rank_0_mp_rank_00_model_states.pt")


@pytest.mark.parametrize("extra, field", [
    ({"checkpoint": {"load_universal": True}}, "train.deepspeed.extra.checkpoint.load_universal"),
    ({"checkpoint": {"writer": {"type": "fast"}}}, "train.deepspeed.extra.checkpoint.writer.type"),
    ({"datastates_ckpt": {"host_cache_size": 1}}, "train.deepspeed.extra.datastates_ckpt.host_cache_size"),
    ({"zero_optimization": {"elastic_checkpoint": True}}, "train.deepspeed.extra.zero_optimization.elastic_checkpoint"),
])
def test_the_spec_refuses_extra_keys_that_change_how_checkpoints_load(extra, field) -> None:
    raw = {"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {}, "output": {"path": "/tmp/unused"},
           "train": {"deepspeed": {"extra": extra}}}
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw, check_model=False)
    assert field in str(e.value) and "checkpoint" in str(e.value)


def test_the_reviews_set_override_is_refused(tmp_path) -> None:
    """The reproduction: ``kscale submit --set 'train.deepspeed.extra={checkpoint: {load_universal: true}}'``."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {},
                                   "output": {"path": str(tmp_path / "run")}}))
    assert load_spec(job, check_model=False).train.deepspeed.extra == {}
    with pytest.raises(SpecError, match=r"train\.deepspeed\.extra\.checkpoint\.load_universal: changes how DeepSpeed "
                                        r"loads checkpoints"):
        load_spec(job, check_model=False, overrides=["train.deepspeed.extra={checkpoint: {load_universal: true}}"])


def test_the_spec_keeps_other_extra_keys() -> None:
    """Expert knobs that do not touch checkpoint loading still pass (activation checkpointing is not one)."""
    extra = {"zero_optimization": {"reduce_bucket_size": 1000}, "activation_checkpointing": {"cpu_checkpointing": False},
             "wall_clock_breakdown": True}
    raw = {"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {}, "output": {"path": "/tmp/unused"},
           "train": {"deepspeed": {"extra": extra}}}
    assert spec_from_dict(raw, check_model=False).train.deepspeed.extra == extra
