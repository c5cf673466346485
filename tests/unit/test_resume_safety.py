"""Issue 11 findings 5 and 8: resume never runs code from the run folder, and never mixes two datasets.

The crafted checkpoint is loaded by a real DeepSpeed engine (a tiny module, one CPU process in a child
Python) through kscale's own ``load_latest_checkpoint``; the data check runs through the train stage's real
claim of its run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kscale.output import DataChanged
from kscale.spec import spec_from_dict
from tests.testing_utils import require_module

REPO = Path(__file__).resolve().parents[2]


def _train_spec(tmp_path: Path, manifest: Path, if_exists: str = "resume"):
    return spec_from_dict({"kind": "train", "model": {"path": "debug:qwen2_5_vl"},
                           "data": {"source": "manifest", "path": str(manifest)},
                           "output": {"path": str(tmp_path / "run"), "if_exists": if_exists}}, check_model=False)


def test_a_manifest_edited_after_a_run_is_refused_under_resume(tmp_path):
    from kscale.train.run import claim_run_dir

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": None, "text": "a", "answer": "b"}) + "\n")
    before = _train_spec(tmp_path, manifest)
    before_fingerprint = before.fingerprint()
    with claim_run_dir(before):
        pass
    with claim_run_dir(_train_spec(tmp_path, manifest)):  # same bytes: resumes
        pass
    manifest.write_text(manifest.read_text() + json.dumps({"image": None, "text": "c", "answer": "d"}) + "\n")
    after = _train_spec(tmp_path, manifest)
    assert after.fingerprint() != before_fingerprint  # the content is part of the fingerprint
    with pytest.raises(DataChanged, match=r"the manifest .*m\.jsonl' changed since this output was written "
                                          r"\(sha256 \w{12}, 44 bytes then; \w{12}, 88 bytes now\)"):
        with claim_run_dir(after):
            pass
    with claim_run_dir(_train_spec(tmp_path, manifest, "overwrite")):  # starting over is allowed
        pass


def test_the_data_identity_of_each_source(tmp_path):
    from datasets import Dataset

    from kscale.data.identity import data_identity
    from kscale.spec import DataSpec

    assert data_identity(DataSpec()) == {"source": "generated"}
    Dataset.from_list([{"text": "a", "image": None}]).save_to_disk(str(tmp_path / "ds"))
    ident = data_identity(DataSpec(source="hf_disk", path=str(tmp_path / "ds")))
    (split,) = ident["splits"].values()
    assert split["fingerprint"] and split["files"][0][1] > 0
    assert json.loads(json.dumps(ident)) == ident  # compared with the copy recorded as JSON
    Dataset.from_list([{"text": "b", "image": None}]).save_to_disk(str(tmp_path / "ds"))
    assert data_identity(DataSpec(source="hf_disk", path=str(tmp_path / "ds"))) != ident
    missing = data_identity(DataSpec(source="manifest", path=str(tmp_path / "nope.jsonl")))
    assert missing["source"] == "manifest" and "unreadable" in missing


CHILD = """
import json, os, pickle, shutil, sys, torch
from pathlib import Path
from kscale.spec import spec_from_dict
from kscale.train import engine as E
from kscale.train.layout import checkpoint_tag
from kscale.train.safe_load import UnsafeCheckpoint

run = Path(sys.argv[1])
cfg = spec_from_dict({"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {},
                      "output": {"path": str(run)}, "train": {"deepspeed": {"zero_stage": 2, "bf16": False}}},
                     check_model=False).train
E.ensure_process_group(torch.device("cpu"))
engine = E.build_engine(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), cfg, 1)
loss = engine(torch.randn(cfg.micro_batch_size, 4)).sum()
engine.backward(loss)
engine.step()
out = {}
E.save_checkpoint(engine, run, 3, 2)
out["real"] = E.load_latest_checkpoint(engine, run)  # DeepSpeed's own checkpoint loads weights-only

class Payload:  # unpickling this runs os.system: what a crafted checkpoint would do
    def __reduce__(self):
        return (os.system, (f"touch {run / 'PWNED'}",))

ckpt = run / "checkpoints"
evil = ckpt / checkpoint_tag(7)
evil.mkdir()
for f in (ckpt / checkpoint_tag(3)).iterdir():
    torch.save({"module": Payload(), "step": 7}, evil / f.name)  # every file DeepSpeed would read
(ckpt / "latest").write_text(checkpoint_tag(7))
elsewhere = run.parent / "elsewhere"  # outside the run, a loadable copy of its real checkpoint: only the name
shutil.copytree(ckpt / checkpoint_tag(3), elsewhere)  # rule (stepNNNNNNNN inside checkpoints/) refuses it
out["elsewhere_loadable"] = (ckpt / "../../elsewhere").resolve() == elsewhere.resolve() and elsewhere.is_dir()
for case, latest in (("crafted", checkpoint_tag(7)), ("escape", "../../elsewhere"), ("absolute", str(elsewhere))):
    (ckpt / "latest").write_text(latest)
    try:
        out[case] = E.load_latest_checkpoint(engine, run)
    except UnsafeCheckpoint as e:
        out[case] = "refused: " + str(e)
out["pwned"] = (run / "PWNED").exists()
print(json.dumps(out))
"""


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    require_module("deepspeed", install="pip install -e '.[train]'")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["real"] == 3
    assert out["crafted"].startswith("refused: checkpoint") and "not loadable as weights only" in out["crafted"]
    assert "unsupported GLOBAL posix.system" in out["crafted"]
    assert out["elsewhere_loadable"] is True  # the escape names a folder that exists (and would load)
    for case in ("escape", "absolute"):
        assert out[case].startswith("refused:") and "not a step folder" in out[case], out[case]
    assert out["pwned"] is False
