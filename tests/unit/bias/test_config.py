"""The bias section: defaults load, and every bad value is reported with its dotted field."""

from __future__ import annotations

import pytest

from kscale.spec import SpecError, spec_from_dict
from tests.unit.bias.conftest import bias_job


def test_defaults_and_field_errors(tmp_path, qwen_dir) -> None:
    spec = spec_from_dict(bias_job(tmp_path, qwen_dir, bias={}))
    assert spec.bias.conditions == ["real", "blank", "noise", "swapped", "none"]
    cases = [
        ({"colour": 1}, {"bias.colour"}),
        ({"conditions": ["blank", "fog"], "blank_rgb": [1, 2], "train_runs": {"a@b": "x"}},
         {"bias.conditions[1]", "bias.conditions", "bias.blank_rgb", "bias.train_runs.a@b"}),
        ({"dropping": {"fractions": [0.5, 0.25, 2.0], "orders": ["loudest"]}},
         {"bias.dropping.fractions", "bias.dropping.fractions[2]", "bias.dropping.orders[0]"}),
    ]
    for bias, want in cases:
        raw = bias_job(tmp_path, qwen_dir)
        raw["bias"] = bias
        with pytest.raises(SpecError) as e:
            spec_from_dict(raw)
        assert {f for f, _ in e.value.problems} >= want, e.value
    raw["bias"] = {"conditions": ["fog"]}
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw)
    assert "'fog' is not one of" in str(e.value)


def test_missing_adapter_is_named(tmp_path, qwen_dir) -> None:
    from kscale.bias.variants import enumerate_variants

    spec = spec_from_dict(bias_job(tmp_path, qwen_dir, bias={"adapter": str(tmp_path / "nope")}))
    with pytest.raises(ValueError, match="bias.adapter: adapter directory .*nope.* does not exist"):
        enumerate_variants(spec.bias)
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    spec = spec_from_dict(bias_job(tmp_path, qwen_dir, bias={"adapter": str(tmp_path / "ia3")}))
    with pytest.raises(ValueError, match="bias.adapter: .*ia3.* is neither a MaLoRA nor a PEFT LoRA adapter"):
        enumerate_variants(spec.bias)
    spec = spec_from_dict(bias_job(tmp_path, qwen_dir, bias={"train_runs": {"m": str(tmp_path)}}))
    with pytest.raises(ValueError, match="bias.train_runs.m: .*adapter_config.json.* is missing"):
        enumerate_variants(spec.bias)
