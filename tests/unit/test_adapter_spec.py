"""``extract.adapter``: what a directory holds is checked at load time, each problem named by its dotted field.

The adapter directories here are files written the way MaLoRA (``format: malora``) and PEFT (``peft_type:
LORA``) write their ``adapter_config.json``; no model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kscale.spec import SpecError, spec_from_dict

# the fingerprint of this spec as computed by kscale before extract.adapter existed (main at a57f0d4):
# a spec without an adapter keeps it, so stores extracted before the section resume as before
OLD_FINGERPRINT = "6c5e4b65d4af6f45"


def _job(adapter: dict | None = None, output: str = "/nonexistent/store") -> dict:
    extract = {"batch_size": 2, **({"adapter": adapter} if adapter is not None else {})}
    return {"kind": "extract", "model": {"path": "debug:qwen2_5_vl", "dtype": "float32"},
            "data": {"source": "generated", "generated": {"n_samples": 4}}, "extract": extract,
            "output": {"path": output}}


def _adapter(d: Path, config: dict) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


MALORA = {"format": "malora", "version": 1, "malora": {"rank": 4, "gate": "scalar"}}
LORA = {"peft_type": "LORA", "r": 4, "target_modules": ["k_proj"]}


def _problems(raw: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        spec_from_dict(raw, check_model=False)
    return dict(e.value.problems)


def test_an_adapter_directory_or_a_train_run_is_accepted(tmp_path) -> None:
    malora = _adapter(tmp_path / "malora", MALORA)
    run = tmp_path / "run"
    _adapter(run / "adapter", LORA)  # a `kind: train` run directory with train.method: lora
    spec = spec_from_dict(_job({"kind": "malora", "path": str(malora)}), check_model=False)
    assert spec.extract.adapter.kind == "malora" and spec.extract.adapter.merge is False
    spec = spec_from_dict(_job({"kind": "lora", "path": str(run), "merge": True}), check_model=False)
    assert spec.extract.adapter.path == str(run) and spec.extract.adapter.merge is True


def test_problems_name_the_dotted_field(tmp_path) -> None:
    lora = _adapter(tmp_path / "lora", LORA)
    malora = _adapter(tmp_path / "malora", MALORA)
    token = _adapter(tmp_path / "token", {**MALORA, "malora": {"rank": 4, "gate": "token"}})
    ia3 = _adapter(tmp_path / "ia3", {"peft_type": "IA3"})
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _problems(_job({"kind": "lora", "path": str(tmp_path / "missing")}))
    assert p == {"extract.adapter.path": f"adapter directory {str(tmp_path / 'missing')!r} does not exist"}
    assert "holds no adapter_config.json" in _problems(_job({"kind": "lora", "path": str(empty)}))[
        "extract.adapter.path"]
    p = _problems(_job({"kind": "malora", "path": str(lora)}))
    assert p == {"extract.adapter.kind": f"'malora', but {str(lora)!r} holds a lora adapter (peft_type: LORA)"}
    p = _problems(_job({"kind": "lora", "path": str(malora)}))
    assert p == {"extract.adapter.kind": f"'lora', but {str(malora)!r} holds a malora adapter (format: malora)"}
    assert "peft_type: IA3" in _problems(_job({"kind": "lora", "path": str(ia3)}))["extract.adapter.path"]
    assert "cannot be merged" in _problems(_job({"kind": "malora", "path": str(token), "merge": True}))[
        "extract.adapter.merge"]
    assert "is not one of 'malora', 'lora'" in _problems(_job({"kind": "qlora", "path": str(lora)}))[
        "extract.adapter.kind"]
    assert _problems(_job({"path": str(lora)})) == {"extract.adapter.kind": "required field is missing"}


def test_a_spec_without_an_adapter_keeps_its_fingerprint() -> None:
    assert spec_from_dict(_job(), check_model=False).fingerprint() == OLD_FINGERPRINT


def test_the_adapter_is_part_of_the_fingerprint(tmp_path) -> None:
    a, b = _adapter(tmp_path / "a", LORA), _adapter(tmp_path / "b", LORA)
    fp = {str(x): spec_from_dict(_job({"kind": "lora", "path": str(x)}), check_model=False).fingerprint()
          for x in (a, b)}
    merged = spec_from_dict(_job({"kind": "lora", "path": str(a), "merge": True}), check_model=False).fingerprint()
    assert len({*fp.values(), merged, OLD_FINGERPRINT}) == 4
