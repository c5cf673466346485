"""The eval stage's spec section and its table, without a model (fast)."""

from __future__ import annotations

import math

import pytest
import torch

from kscale.spec import STAGES, SpecError, spec_from_dict


def _job(tmp_path, **ev) -> dict:
    return {"kind": "eval", "model": {"path": "debug:qwen2_5_vl", "device": "cpu"},
            "eval": {"tasks": ["mmstar"], **ev}, "output": {"path": str(tmp_path / "ev")}}


def test_eval_is_a_stage_of_the_table(tmp_path) -> None:
    spec = spec_from_dict(_job(tmp_path), check_model=False)
    assert STAGES["eval"].entry == "kscale.eval.run:stage_entry" and spec.eval.blind
    assert [v.name for v in spec.eval.variants] == ["base"] and spec.eval.variants[0].kind == "base"


@pytest.mark.parametrize("ev, field", [
    ({"tasks": []}, "eval.tasks"),
    ({"variants": [{"name": "a", "kind": "malora"}]}, "eval.variants[0].path"),
    ({"variants": [{"name": "a", "path": "/x"}]}, "eval.variants[0].path"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "eval.variants"),
    ({"variants": [{"name": "a", "kind": "qlora", "path": "/x"}]}, "eval.variants[0].kind"),
    ({"limit": 0}, "eval.limit"),
])
def test_eval_section_problems_name_the_field(tmp_path, ev, field) -> None:
    with pytest.raises(SpecError) as e:
        spec_from_dict(_job(tmp_path, **ev), check_model=False)
    assert field in [f for f, _ in e.value.problems], e.value.problems


def _results(acc: float, err, n: int = 10) -> dict:
    return {"results": {"t": {"alias": "t", "acc,none": acc, "acc_stderr,none": err,
                              "acc_stderr_clt,none": 0.5, "acc_stderr_clustered,none": "N/A"}},
            "n-samples": {"t": {"original": 20, "effective": n}}}


def test_score_rows_blind_score_and_gain() -> None:
    from kscale.eval.table import score_rows

    rows = score_rows({("base", False): _results(0.8, 0.1), ("base", True): _results(0.3, 0.2),
                       ("m", False): _results(0.5, "N/A")})
    assert [(r["variant"], r["metric"]) for r in rows] == [("base", "acc,none"), ("m", "acc,none")]
    base, m = rows
    assert base["score"] == 0.8 and base["blind_score"] == 0.3 and base["n"] == 10
    assert base["gain"] == pytest.approx(0.5) and base["gain_stderr"] == pytest.approx(math.hypot(0.1, 0.2))
    assert m["stderr"] is None and m["blind_score"] is None and m["gain"] is None


def test_cut_at_and_the_continuation_mask() -> None:
    from tests.testing_utils import require_module

    require_module("lmms_eval", install="pip install --no-deps lmms-eval==0.7.3")
    from kscale.eval.lmms_model import continuation_mask, cut_at

    assert cut_at("A. red\nQ: next", ["\n", "Q:"]) == "A. red"
    assert cut_at("abc", []) == "abc"
    ids = torch.tensor([[5, 6, 7, 2, 0], [5, 8, 2, 0, 0]])
    answer = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    got = continuation_mask(answer, ids, eos_id=2)
    assert got.tolist() == [[False, True, True, False, False], [False, True, False, False, False]]
    assert continuation_mask(answer, ids, eos_id=None).tolist() == answer.tolist()


def test_a_train_run_directory_means_its_adapter(tmp_path) -> None:
    from kscale.eval.variants import malora_dir

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    assert malora_dir(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert malora_dir(tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter"
