"""The bias stage end to end on the tiny Qwen: outputs, variants (adapter, train checkpoints) against direct
evaluation, resume and sharding as for extraction, and the same table from the in-process and Ray executors.

Legend: B batch, T tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from kscale.bias.run import RunExistsError
from kscale.bias.worker import score
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.unit.bias.conftest import bias_job, records

NUMERIC_TOL = 1e-5  # padded batches of different shape run different kernels


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, qwen_dir):
    """A train run directory laid out as kscale.train writes it (adapter/ + DeepSpeed ZeRO-2 checkpoints)."""
    from kscale.models import load_model
    from kscale.spec import ModelSpec
    from kscale.train.malora import MaLoRAConfig, MaLoRAModel

    root = tmp_path_factory.mktemp("train_run")
    lm = load_model(ModelSpec(path=qwen_dir, dtype="float32"))
    malora = MaLoRAModel(lm.model, MaLoRAConfig(rank=4, target_modules=["k_proj", "v_proj"]))
    states = {}
    for step, seed in ((10, 1), (20, 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in malora.adapter_parameters().items():
                if "_B_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        states[step] = {k: v.clone() for k, v in malora.adapter_state_dict().items()}  # not views
        ckpt = root / "checkpoints" / f"step{step:08d}"
        ckpt.mkdir(parents=True)
        torch.save({"module": {f"malora.model.{k}": v for k, v in states[step].items()},
                    "ds_config": {"zero_optimization": {"stage": 2}}}, ckpt / "mp_rank_00_model_states.pt")
    malora.save_pretrained(root / "adapter", state=states[20])
    return root, states


def _spec(tmp_path, qwen_dir, **over):
    return spec_from_dict(bias_job(tmp_path, qwen_dir, **over))


def test_job_outputs_and_variants_match_direct_evaluation(tmp_path, qwen_dir, train_run) -> None:
    run_dir, states = train_run
    spec = _spec(tmp_path, qwen_dir, bias={"adapter": str(run_dir / "adapter"), "train_runs": {"malora": str(run_dir)}})
    out = run_job(spec, show_bar=False)
    assert out.state == "succeeded" and out.variants == ["base", "adapter", "malora@10", "malora@20"]
    d = tmp_path / "bias"
    for name in ("samples.parquet", "aggregate.csv", "dependency.png", "dropping.png", "checkpoints.png",
                 "report.html", "bias.json", "_progress.json"):
        assert (d / name).is_file(), name
    assert "Modality bias" in (d / "report.html").read_text()
    df = pd.read_parquet(d / "samples.parquet")
    assert len(df) == 4 * 8 and set(df.variant) == {"base", "adapter", "malora@10", "malora@20"}
    by = {v: g.set_index("sample_id") for v, g in df.groupby("variant")}
    assert by["malora@20"].step.eq(20).all() and by["malora@20"].run.eq("malora").all()
    # the final adapter holds the step-20 weights: same rows
    np.testing.assert_allclose(by["adapter"].ll_real, by["malora@20"].ll_real, atol=1e-6)
    assert np.abs(by["malora@10"].ll_real - by["malora@20"].ll_real).max() > 1e-3
    # independent reference: a fresh model with the adapter injected by hand, scored one sample at a time
    from kscale.models import load_model
    from kscale.train.malora import MaLoRAModel

    for variant, state in (("base", None), ("malora@10", states[10])):
        lm = load_model(spec.model)
        if state is not None:
            m = MaLoRAModel.from_pretrained(lm.model, run_dir / "adapter")
            m.load_adapter_state_dict(state)
        src, recs = records(8, tasks=("color", "conflict"))
        for r in recs[:3]:
            b = lm.adapter.build_batch(lm, [r.image], [r.text], [r.answer])
            ref = score(lm, b.inputs, b.answer_mask_BT).ll_mean[0]
            assert by[variant].ll_real[r.sample_id] == pytest.approx(ref, abs=NUMERIC_TOL)
    agg = pd.read_csv(d / "aggregate.csv")
    conflict = agg[(agg.task == "conflict") & (agg.metric == "follows_image_real")]
    assert len(conflict) == 4 and conflict.n.eq(4).all()
    assert set(agg.metric) >= {"dependency_blank", "dependency_swapped", "blind_share", "drop_loss_text", "agree_blind"}


def test_resume_skips_committed_and_refuses_another_spec(tmp_path, qwen_dir) -> None:
    spec = _spec(tmp_path, qwen_dir)
    first = run_job(spec, show_bar=False)
    table = pd.read_parquet(tmp_path / "bias" / "samples.parquet")
    again = run_job(spec, show_bar=False)
    assert again.shards_skipped == first.shards_total == 2 and again.shards_done == 0
    marker = next((tmp_path / "bias" / "shards").glob("base.s000001.done.json"))
    marker.unlink()  # as if killed before the commit: only that shard runs again
    third = run_job(spec, show_bar=False)
    assert third.shards_done == 1 and third.shards_skipped == 1
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "bias" / "samples.parquet"), table)
    other = _spec(tmp_path, qwen_dir, bias={"seed": 1})
    with pytest.raises(RunExistsError, match="different spec"):
        run_job(other, show_bar=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="not a kscale bias run"):
        run_job(_spec(tmp_path, qwen_dir, output={"path": str(tmp_path / "foreign")}), show_bar=False)
    assert (tmp_path / "foreign" / "x.txt").read_text() == "mine"


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["variant", "sample_id"]).reset_index(drop=True).select_dtypes("number")


def test_sharding_does_not_change_results(tmp_path, qwen_dir) -> None:
    a = run_job(_spec(tmp_path / "a", qwen_dir, data={"shard_size": 3}), show_bar=False)
    b = run_job(_spec(tmp_path / "b", qwen_dir, data={"shard_size": 8}, bias={"batch_size": 8}), show_bar=False)
    assert a.shards_total == 3 and b.shards_total == 1
    ta, tb = pd.read_parquet(a.samples_table), pd.read_parquet(b.samples_table)
    pd.testing.assert_frame_equal(_numeric(ta), _numeric(tb), atol=NUMERIC_TOL, check_exact=False)
    assert ta.swap_donor.tolist() == tb.swap_donor.tolist()


def test_ray_executor_gives_the_same_table(tmp_path, qwen_dir, ray_local) -> None:
    local = run_job(_spec(tmp_path / "local", qwen_dir), show_bar=False)
    ray_spec = _spec(tmp_path / "ray", qwen_dir, resources={"executor": "ray", "workers": 2, "cpus_per_worker": 1})
    remote = run_job(ray_spec, show_bar=False)
    assert remote.state == "succeeded" and remote.shards_done == 2
    ta, tb = pd.read_parquet(local.samples_table), pd.read_parquet(remote.samples_table)
    pd.testing.assert_frame_equal(_numeric(ta), _numeric(tb), atol=NUMERIC_TOL, check_exact=False)
    progress = json.loads((tmp_path / "ray" / "bias" / "_progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["samples"] == 8
