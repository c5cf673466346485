"""A real ``kind: train`` run (ZeRO-3, so parameters are partitioned in its checkpoints) fed to ``kind: bias``.

The bias stage reads the run's DeepSpeed checkpoints with DeepSpeed's own ``zero_to_fp32`` gather and its
final adapter from ``adapter/``; the trainer wrote the adapter through a different path (the ZeRO-3
``GatheredParameters`` of :func:`kscale.train.engine.gathered_adapter_state`). The final checkpoint and
the adapter must hold the same tensors, the bias rows of the final checkpoint must equal the adapter's,
and those must equal a fresh model with the adapter loaded by hand.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.integration.test_train_deepspeed import _generated, _raw_spec, _run
from tests.testing_utils import require_module

require_module("deepspeed", install="pip install -e '.[train]'")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, qwen_dir):
    run_dir = tmp_path_factory.mktemp("zero3_run") / "run"
    raw = _raw_spec(qwen_dir, run_dir, _generated(16), max_steps=2, checkpoint_every=1, grad_accum=1,
                    keep_checkpoints=5, deepspeed={"zero_stage": 3})
    _run(raw, run_dir)
    return raw, run_dir


def test_zero3_checkpoints_gather_to_the_saved_adapter(zero3_run) -> None:
    from safetensors.torch import load_file

    from kscale.bias.variants import checkpoint_adapter_state, checkpoint_variants

    _, run_dir = zero3_run
    variants = checkpoint_variants("m", str(run_dir), "all")
    assert [v.step for v in variants] == [1, 2]
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    first, last = (checkpoint_adapter_state(v.path) for v in variants)
    assert sorted(last) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(last[name].float(), tensor.float()), name
    assert any(not torch.equal(first[n], last[n]) for n in saved)  # step 1 is another point of the curve


def test_bias_job_scores_the_train_run(zero3_run, qwen_dir, tmp_path) -> None:
    from kscale.bias.worker import score
    from kscale.models import load_model
    from kscale.runner import run_job
    from kscale.spec import spec_from_dict
    from kscale.train.malora import MaLoRAModel
    from tests.unit.bias.conftest import bias_job, records

    _, run_dir = zero3_run
    spec = spec_from_dict(bias_job(
        tmp_path, qwen_dir, data={"generated": {"n_samples": 4, "image_size": 56, "tasks": ["color"]}},
        bias={"adapter": str(run_dir / "adapter"), "train_runs": {"m": str(run_dir)}, "conditions": ["real", "blank"],
              "dropping": {"enabled": False}, "bootstrap": 50}))
    out = run_job(spec, show_bar=False)
    assert out.state == "succeeded" and out.variants == ["base", "adapter", "m@1", "m@2"]
    df = pd.read_parquet(tmp_path / "bias" / "samples.parquet")
    by = {v: g.set_index("sample_id").sort_index() for v, g in df.groupby("variant")}
    torch.testing.assert_close(torch.tensor(by["m@2"].ll_real.values), torch.tensor(by["adapter"].ll_real.values),
                               atol=1e-6, rtol=0)
    assert (by["m@2"].ll_real - by["base"].ll_real).abs().max() > 1e-4  # training moved the answers
    lm = load_model(spec.model)
    MaLoRAModel.from_pretrained(lm.model, run_dir / "adapter")
    _, recs = records(4, tasks=("color",))
    for r in recs[:2]:
        b = lm.adapter.build_batch(lm, [r.image], [r.text], [r.answer])
        assert by["m@2"].ll_real[r.sample_id] == pytest.approx(score(lm, b.inputs, b.answer_mask_BT).ll_mean[0],
                                                                abs=1e-5)
