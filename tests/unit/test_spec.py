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
