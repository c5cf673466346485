"""The eval stage's Ray driver without Ray (kscale.eval.launch): the paths its ranks get, and what a failure
names as being evaluated."""

from __future__ import annotations

import json

from kscale.eval.launch import absolute_variant_paths, in_progress
from kscale.spec import spec_from_dict


def _spec(tmp_path, variants: list[dict], blind: bool = True):
    return spec_from_dict({"kind": "eval", "model": {"path": "debug:qwen2_5_vl", "device": "cpu"},
                           "eval": {"tasks": ["mmstar", "pope"], "variants": variants, "blind": blind},
                           "output": {"path": str(tmp_path / "ev")}}, check_model=False)


def test_relative_adapter_paths_become_absolute_hub_ids_stay(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train").mkdir(parents=True)
    (tmp_path / "runs" / "analysis").mkdir()
    spec = absolute_variant_paths(_spec(tmp_path, [
        {"name": "m", "kind": "malora", "path": "runs/train", "analysis_run": "runs/analysis"},
        {"name": "hub", "kind": "lora", "path": "someone/qwen-lora"},  # a PEFT adapter on the hub
        {"name": "abs", "kind": "lora", "path": str(tmp_path / "runs" / "train")}]))
    m, hub, ab = spec.eval.variants
    assert m.path == str(tmp_path / "runs" / "train") and m.analysis_run == str(tmp_path / "runs" / "analysis")
    assert hub.path == "someone/qwen-lora" and hub.analysis_run is None
    assert ab.path == str(tmp_path / "runs" / "train")


def test_the_variant_in_progress_is_the_first_without_its_run_files(tmp_path) -> None:
    spec = _spec(tmp_path, [{"name": "base"}, {"name": "m", "kind": "malora", "path": "/x"}])
    run = tmp_path / "ev"
    (run / "runs").mkdir(parents=True)
    assert in_progress(spec, run) == "variant 'base' (with the image and blind) on tasks mmstar, pope"
    for name in ("base.json", "base.blind.json"):
        (run / "runs" / name).write_text(json.dumps({}))
    assert in_progress(spec, run) == "variant 'm' (with the image and blind) on tasks mmstar, pope"
    (run / "runs" / "m.json").write_text("{}")
    assert in_progress(spec, run) == "variant 'm' (blind) on tasks mmstar, pope"
    (run / "runs" / "m.blind.json").write_text("{}")
    assert in_progress(spec, run).startswith("the run's tables")
    assert in_progress(_spec(tmp_path, [{"name": "base"}], blind=False), run).startswith("the run's tables")
