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

    assert data_identity(DataSpec()) == {"source": "generated", "limit": None, "generated": {
        "n_samples": 64, "image_size": 56, "seed": 0, "tasks": ["caption", "color", "shape", "count", "position"]}}
    Dataset.from_list([{"text": "a", "image": None}]).save_to_disk(str(tmp_path / "ds"))
    ident = data_identity(DataSpec(source="hf_disk", path=str(tmp_path / "ds")))
    (split,) = ident["splits"].values()
    assert split["fingerprint"] and split["files"][0][1] > 0
    assert json.loads(json.dumps(ident)) == ident  # compared with the copy recorded as JSON
    Dataset.from_list([{"text": "b", "image": None}]).save_to_disk(str(tmp_path / "ds"))
    assert data_identity(DataSpec(source="hf_disk", path=str(tmp_path / "ds"))) != ident
    missing = data_identity(DataSpec(source="manifest", path=str(tmp_path / "nope.jsonl")))
    assert missing["source"] == "manifest" and "unreadable" in missing


# ---------------------------------------------------------------- issue 21 item 8: resume never mixes runs


def _generated_train(tmp_path: Path, seed: int = 0, lr: float = 2e-4, tasks=("color", "shape"),
                     if_exists: str = "resume"):
    return spec_from_dict({"kind": "train", "model": {"path": "debug:qwen2_5_vl"},
                           "data": {"generated": {"seed": seed, "n_samples": 8, "tasks": list(tasks)}},
                           "train": {"lr": lr},
                           "output": {"path": str(tmp_path / "run"), "if_exists": if_exists}}, check_model=False)


def test_train_resume_refuses_another_data_seed_tasks_or_lr(tmp_path):
    """The reproduction: a rerun with another data seed, tasks and lr resumed from the first run's
    checkpoint. Every change is refused under resume, saying what changed; the same spec resumes."""
    from kscale.output import OutputExists
    from kscale.train.run import claim_run_dir

    with claim_run_dir(_generated_train(tmp_path)):
        pass
    with claim_run_dir(_generated_train(tmp_path)):  # the same run resumes
        pass
    recorded = json.loads((tmp_path / "run" / "kscale.json").read_text())["spec"]
    assert recorded["train"]["lr"] == 2e-4 and "cluster" not in recorded and "resources" not in recorded
    with pytest.raises(DataChanged, match=r"the generated data changed .*: data\.generated\.seed was 0, now 1"):
        with claim_run_dir(_generated_train(tmp_path, seed=1)):
            pass
    with pytest.raises(DataChanged, match=r"data\.generated\.tasks was \['color', 'shape'\], now \['color'\]"):
        with claim_run_dir(_generated_train(tmp_path, tasks=("color",))):
            pass
    with pytest.raises(OutputExists, match=r"written by a different spec .*: train\.lr was 0\.0002, now 0\.001\)"):
        with claim_run_dir(_generated_train(tmp_path, lr=1e-3)):
            pass
    with claim_run_dir(_generated_train(tmp_path, lr=1e-3, if_exists="overwrite")) as run:  # starting over: allowed
        assert sorted(p.name for p in run.iterdir()) == ["kscale.json"]


def test_a_run_recorded_by_an_older_kscale_still_resumes(tmp_path):
    """Markers written before generated data had a full identity (``{"source": "generated"}``) and before
    markers held the spec: the same spec resumes, another is still refused (by its fingerprint)."""
    from kscale.output import OutputExists
    from kscale.train.run import claim_run_dir

    spec = _generated_train(tmp_path)
    with claim_run_dir(spec):
        pass
    marker = tmp_path / "run" / "kscale.json"
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k != "spec"}
    marker.write_text(json.dumps({**old, "data": {"source": "generated"}}))
    with claim_run_dir(spec):
        pass
    with pytest.raises(OutputExists, match="written by a different spec"):
        with claim_run_dir(_generated_train(tmp_path, seed=1)):
            pass


def _manifest_with_image(tmp_path: Path) -> Path:
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "img/a.png", "text": "a", "answer": "b"}) + "\n"
                        + json.dumps({"image": None, "text": "c", "answer": "d"}) + "\n")
    return manifest


def _replace_image(path: Path) -> None:
    """Another picture of the same byte size, written as any tool would (a new mtime)."""
    from PIL import Image

    st = path.stat()
    Image.new("RGB", (8, 8), "blue").save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_changed_image_behind_an_unchanged_manifest_is_data_changed(tmp_path):
    from kscale.train.run import claim_run_dir

    manifest = _manifest_with_image(tmp_path)
    with claim_run_dir(_train_spec(tmp_path, manifest)):
        pass
    before = manifest.read_bytes()
    _replace_image(tmp_path / "img" / "a.png")
    assert manifest.read_bytes() == before
    with pytest.raises(DataChanged, match=r"an image file that the manifest .*m\.jsonl' names changed since this "
                                          r"output was written \(size or modification time of its 1 image files"):
        with claim_run_dir(_train_spec(tmp_path, manifest)):
            pass
    (tmp_path / "img" / "a.png").unlink()
    with pytest.raises(DataChanged, match="1 missing now"):
        with claim_run_dir(_train_spec(tmp_path, manifest)):
            pass


def test_extraction_resume_refuses_a_changed_image_too(tmp_path):
    import zarr

    from kscale.data.identity import data_identity
    from kscale.extract.run import claim_store
    from kscale.spec import to_dict
    from kscale.store.layout import STORE_FORMAT

    manifest = _manifest_with_image(tmp_path)
    spec = spec_from_dict({"kind": "extract", "model": {"path": "debug:qwen2_5_vl"},
                           "data": {"source": "manifest", "path": str(manifest)},
                           "output": {"path": str(tmp_path / "store")}}, check_model=False)

    def attrs() -> dict:  # what root_attrs records about spec and data
        return {"format": STORE_FORMAT, "spec": to_dict(spec), "spec_fingerprint": spec.fingerprint(),
                "data": data_identity(spec.data)}

    with claim_store(spec, attrs):
        pass
    assert "images" in dict(zarr.open_group(str(tmp_path / "store"), mode="r").attrs)["data"]
    _replace_image(tmp_path / "img" / "a.png")
    with pytest.raises(DataChanged, match="an image file that the manifest"):
        with claim_store(spec, attrs):
            pass


def _analysis(tmp_path: Path, store: Path, if_exists: str = "resume"):
    return spec_from_dict({"kind": "analyze", "analyze": {"stores": [str(store)]},
                           "output": {"path": str(tmp_path / "analysis"), "if_exists": if_exists}})


def _store(path: Path, fingerprint: str) -> Path:
    from tests.unit.test_store_v2 import make_store
    import zarr

    make_store(path, n_shards=1)
    zarr.open_group(str(path), mode="r+").attrs.update({"spec_fingerprint": fingerprint, "created_at": fingerprint})
    return path


def test_analysis_of_another_store_into_a_run_folder_is_refused_or_clean(tmp_path):
    """The reproduction: store B analysed into the folder of store A's analysis kept A's attention tables.
    Another store (another path, or the same path re-extracted) is refused under resume, saying what changed;
    a resume of the same run starts from a cleared folder; overwrite from an empty one."""
    from kscale.analysis.run import claim_analysis
    from kscale.output import OutputExists

    a, b = _store(tmp_path / "A", "aaaa"), _store(tmp_path / "B", "bbbb")
    with claim_analysis(_analysis(tmp_path, a)) as run:
        (run / "attention_vs_gap_A.csv").write_text("A's table")
        (run / "figures").mkdir()
    with pytest.raises(OutputExists, match=r"cannot be resumed: the key stores analysed changed .*A'.* then, None now; "
                                           r"store .*B': None then"):  # a DataChanged (stores differ, so do specs)
        with claim_analysis(_analysis(tmp_path, b)):
            pass
    other = spec_from_dict({"kind": "analyze", "analyze": {"stores": [str(a)], "layers": [3]},
                            "output": {"path": str(tmp_path / "analysis")}})
    with pytest.raises(OutputExists, match=r"different spec .*: analyze\.layers was 'all', now \[3\]\)"):
        with claim_analysis(other):
            pass
    _store(a, "a2a2")  # store A re-extracted in place by another spec
    with pytest.raises(DataChanged, match=r"the key stores analysed changed .*A'.*'spec_fingerprint': 'aaaa'.*"
                                          r"'spec_fingerprint': 'a2a2'"):
        with claim_analysis(_analysis(tmp_path, a)):
            pass
    assert (tmp_path / "analysis" / "attention_vs_gap_A.csv").exists()  # a refusal touches nothing
    with claim_analysis(_analysis(tmp_path, b, "overwrite")) as run:
        assert sorted(p.name for p in run.iterdir()) == ["kscale.json"]
        (run / "attention_vs_gap_B.csv").write_text("B's table, half written when killed")
    with claim_analysis(_analysis(tmp_path, b)) as run:  # the same run again: recomputed from a clear folder
        assert sorted(p.name for p in run.iterdir()) == ["kscale.json"]


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
