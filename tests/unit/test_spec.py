"""Spec loading: every problem is reported with its dotted field and value; nothing is written."""

import subprocess
import sys

import pytest
import yaml

from kscale.spec import SpecError, load_spec, spec_from_dict
from tests.conftest import extract_spec


def problems(d) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        spec_from_dict(d)
    return dict(e.value.problems)


def test_valid_spec_round_trip(tmp_path):
    s = spec_from_dict(extract_spec(tmp_path))
    assert s.kind == "extract" and s.extract.layers == "all" and s.model.trust_remote_code is False
    assert s.output.if_exists == "resume"
    with pytest.raises(Exception):
        s.name = "x"  # frozen


def test_unknown_keys_are_errors_with_dotted_names(tmp_path):
    d = extract_spec(tmp_path)
    d["extract"]["layerz"] = [0]
    d["bogus"] = 1
    p = problems(d)
    assert "extract.layerz" in p and "unknown key" in p["extract.layerz"]
    assert "bogus" in p


def test_wrong_types_and_values_all_reported(tmp_path):
    d = extract_spec(tmp_path)
    d["extract"].update(batch_size="four", key_dtype="float8", heads=[0, "x"])
    d["data"]["shard_size"] = 0
    p = problems(d)
    assert "four" in p["extract.batch_size"]
    assert "float8" in p["extract.key_dtype"]
    assert "extract.heads[1]" in p
    assert "data.shard_size" in p


def test_out_of_range_layer_and_head(tmp_path):
    d = extract_spec(tmp_path)
    d["extract"].update(layers=[0, 40], heads=[5])
    p = problems(d)
    assert p["extract.layers[1]"] == "layer 40 out of range (model has 2)"
    assert "extract.heads[0]" in p


def test_nonexistent_model_path(tmp_path):
    p = problems(extract_spec(tmp_path, model=str(tmp_path / "nope")))
    assert "does not exist" in p["model.path"]


def test_missing_sections(tmp_path):
    p = problems({"kind": "extract", "output": {"path": str(tmp_path)}})
    assert "model" in p and "data" in p
    assert "kind" in problems({"kind": "nope"})


def test_yaml_safe_loading_and_malformed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: extract\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_spec(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("kind: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_spec(evil)


def test_cli_validate_exit_codes_and_no_store(tmp_path):
    d = extract_spec(tmp_path)
    d["extract"]["layers"] = [99]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "kscale.cli", "submit", str(job)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "extract.layers[0]: layer 99 out of range (model has 2)" in r.stderr
    assert not (tmp_path / "store").exists()
    d["extract"]["layers"] = [0, -1]
    job.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "kscale.cli", "validate", "--explain", str(job)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "extract.sample_tokens.image" in r.stdout


def test_fingerprint_ignores_resources(tmp_path):
    a = spec_from_dict(extract_spec(tmp_path))
    b = spec_from_dict(extract_spec(tmp_path, resources={"executor": "ray", "workers": 3}))
    c = spec_from_dict(extract_spec(tmp_path, extract={"batch_size": 4, "key_dtype": "float16"}))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_train_layers_checked_against_model(tmp_path):
    d = {"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {"source": "generated"},
         "train": {"malora": {"layers": [0, 7]}, "align": {"layers": [-3]}}, "output": {"path": str(tmp_path)}}
    p = problems(d)
    assert p["train.malora.layers[1]"] == "layer 7 out of range (model has 2)"
    assert "train.align.layers[0]" in p


def test_bounds_are_checked_by_the_loader_with_the_dotted_field(tmp_path):
    d = extract_spec(tmp_path)
    d["extract"].update(batch_size=0, sample_tokens={"image": 0, "text": "all"})
    d["resources"] = {"cpus_per_worker": 0, "workers": 1}
    d["data"]["generated"] = {"image_size": 4}
    p = problems(d)
    assert p["extract.batch_size"] == "must be >= 1 (got 0)"
    assert p["extract.sample_tokens.image"] == "must be >= 1 (got 0)"
    assert p["resources.cpus_per_worker"] == "must be > 0 (got 0.0)"
    assert p["data.generated.image_size"] == "must be >= 8 (got 4)"
    assert "extract.sample_tokens.text" not in p


def test_enum_lists_name_the_allowed_values_and_cross_field_checks_still_run(tmp_path):
    d = {"kind": "train", "model": {"path": "debug:qwen2_5_vl"}, "data": {"source": "generated", "generated": {
        "tasks": ["color", "smell"]}}, "output": {"path": str(tmp_path)},
         "train": {"malora": {"target_modules": ["qkv"], "image_branch": False, "text_branch": False,
                              "dropout": 1.0},
                   "eval": {"heldout_fraction": 1.5}}}
    p = problems(d)
    assert p["data.generated.tasks[1]"].startswith("'smell' is not one of 'caption', 'color'")
    assert p["train.malora.target_modules[0]"].startswith("'qkv' is not one of 'q_proj', 'k_proj'")
    assert p["train.malora.dropout"] == "must be in [0, 1) (got 1.0)"
    assert p["train.eval.heldout_fraction"] == "must be in (0, 1) (got 1.5)"
    assert p["train.malora.image_branch"] == "both branches are off: nothing to train"  # validate() ran too


def test_every_section_is_typed_and_explain_shows_types_and_bounds():
    from kscale.spec import JobSpec, explain

    assert not [t for t in JobSpec.__annotations__.values() if "Any" in str(t)]
    rows = {name: (tp, doc) for name, tp, _, doc in explain()}
    assert rows["train"][0] == "TrainConfig | None" and rows["analyze"][0] == "AnalyzeConfig | None"
    assert rows["train.malora.rank"][1].endswith("(>= 1)")
    assert "'q_proj'" in rows["train.malora.target_modules"][0]


def test_one_field_helper():
    import dataclasses
    import inspect

    import kscale.spec
    import kscale.spec.analyze
    import kscale.spec.bias
    import kscale.spec.cluster
    import kscale.spec.fields
    import kscale.spec.malora
    import kscale.spec.train

    for mod in (kscale.spec, kscale.spec.analyze, kscale.spec.bias, kscale.spec.cluster, kscale.spec.fields,
                kscale.spec.malora, kscale.spec.train):
        assert "metadata=" not in inspect.getsource(mod).replace("metadata=metadata", ""), mod.__name__
        for cls in [c for c in vars(mod).values() if dataclasses.is_dataclass(c)]:
            assert all(f.metadata.get("doc") for f in dataclasses.fields(cls)), cls


def test_cluster_bounds_are_field_bounds(tmp_path):
    """The cluster section's numeric limits are declared on the fields (doc(..., ge=)), checked by the loader."""
    raw = extract_spec(tmp_path)
    raw["cluster"] = {"ray": {"node_wait_s": 0}, "slurm": {"nodes": 0, "gpus_per_node": -1, "cpus_per_node": 0,
                                                           "grace_s": -5},
                      "k8s": {"worker_replicas": 0, "gpus_per_pod": -1, "ttl_seconds_after_finished": -1,
                              "active_deadline_seconds": 0, "pre_running_deadline_seconds": 0}}
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw, check_model=False)
    p = dict(e.value.problems)
    assert p["cluster.ray.node_wait_s"] == "must be >= 1 (got 0)"
    assert p["cluster.slurm.nodes"] == "must be >= 1 (got 0)" and p["cluster.slurm.grace_s"] == "must be >= 0 (got -5)"
    assert p["cluster.slurm.gpus_per_node"] == "must be >= 0 (got -1)"
    assert p["cluster.slurm.cpus_per_node"] == "must be >= 1 (got 0)"
    assert p["cluster.k8s.worker_replicas"] == "must be >= 1 (got 0)"
    assert p["cluster.k8s.gpus_per_pod"] == "must be >= 0 (got -1)"
    assert p["cluster.k8s.ttl_seconds_after_finished"] == "must be >= 0 (got -1)"
    assert p["cluster.k8s.active_deadline_seconds"] == "must be >= 1 (got 0)"
    assert p["cluster.k8s.pre_running_deadline_seconds"] == "must be >= 1 (got 0)"
    assert len(p) == 10
