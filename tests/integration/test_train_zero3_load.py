"""ZeRO-3 loading that never holds the whole model, and the training length cap.

Two gloo ranks on CPU (``torchrun``): with ``partitioned_load`` each rank holds 1/world of the base model
right after ``from_pretrained`` (not only after ``deepspeed.initialize``), and the run trains exactly
like the full-load path (same losses, same adapter). Peak host memory per rank is measured by
``bench/zero3_load.py``, not here.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_train_deepspeed import _generated, _raw_spec, _run
from tests.testing_utils import require_module

require_module("deepspeed", install="pip install -e '.[train]'")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from kscale.models.debug import build_debug_model

    return build_debug_model("qwen2_5_vl", tmp_path_factory.mktemp("debug_qwen"), seed=0)


def _ranks(run_dir) -> list[dict]:
    return [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(1500)  # two 2-rank runs: ~40 s on an idle machine, much more on a shared one
def test_zero3_partitioned_load_holds_a_share_and_trains_like_the_full_load(model_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    runs = {}
    for partitioned in (True, False):
        run_dir = tmp_path / f"partitioned_{partitioned}"
        raw = _raw_spec(model_dir, run_dir, _generated(), max_steps=4, micro_batch_size=1,
                        deepspeed={"zero_stage": 3, "partitioned_load": partitioned})
        runs[partitioned] = (_run(raw, run_dir, nproc=2, timeout=700), run_dir)
    (losses, run_dir), (full_losses, full_dir) = runs[True], runs[False]
    for report in _ranks(run_dir):
        for when in ("loaded", "first_step"):
            r = report[when]
            assert 0 < r["all_local"] <= r["all_full"] / 2 + 1000, (when, r)  # 1/world, padding aside
    assert all(r["loaded"]["all_local"] == r["loaded"]["all_full"] for r in _ranks(full_dir))  # the old way
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full_losses), rtol=1e-6, atol=0)
    a, b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors")), load_file(
        str(full_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_training_skips_samples_over_max_seq_len_and_records_them(model_dir, tmp_path) -> None:
    from kscale.data import open_source
    from kscale.models.registry import load_model
    from kscale.spec import spec_from_dict
    from kscale.train.data import collate

    raw = _raw_spec(model_dir, tmp_path / "capped", _generated(), max_steps=3)
    spec = spec_from_dict(raw)
    loaded, source = load_model(spec.model), open_source(spec.data)
    lengths = {i: int(collate(loaded, [source.get(i)]).inputs["attention_mask"].sum()) for i in range(len(source))}
    cap = sorted(lengths.values())[len(lengths) // 2]
    raw["train"]["max_seq_len"] = cap
    _run(raw, tmp_path / "capped")
    errors = json.loads((tmp_path / "capped" / "errors.json").read_text())
    assert errors, "the cap must skip some samples"
    for e in errors:
        assert lengths[e["sample_id"]] > cap and f"longer than train.max_seq_len={cap}" in e["reason"]
