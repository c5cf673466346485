"""GPU checks (marker `gpu`, run on a machine with CUDA: `pytest -m gpu`): extraction on CUDA gives the
CPU store's keys and exactly its token table; the Ray executor gives actors one GPU each."""

from __future__ import annotations

import numpy as np
import pytest

import kscale.store
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.store.layout import MODALITIES
from tests.conftest import extract_spec, require_gpu

pytestmark = [pytest.mark.gpu, require_gpu]


@pytest.mark.parametrize("model", ["debug:qwen2_5_vl", "debug:llava"])
def test_cuda_extraction_matches_cpu(tmp_path, model):
    cpu = extract_spec(tmp_path / "cpu", model=model)
    gpu = extract_spec(tmp_path / "gpu", model=model)
    gpu["model"]["device"] = "cuda"
    run_job(spec_from_dict(cpu), show_bar=False)
    run_job(spec_from_dict(gpu), show_bar=False)
    a, b = kscale.store.open(cpu["output"]["path"]), kscale.store.open(gpu["output"]["path"])
    for m in MODALITIES:
        for col, v in a.tokens(m).items():
            assert np.array_equal(v, b.tokens(m)[col]), (m, col)
        for layer in a.layers:  # float32 on both; TF32/cuBLAS order differences only
            np.testing.assert_allclose(b.keys(layer, m).compute(), a.keys(layer, m).compute(), atol=2e-4)


def test_ray_actors_get_one_gpu_each(tmp_path, ray_local):
    d = extract_spec(tmp_path, resources={"executor": "ray", "workers": 1, "gpus_per_worker": 1})
    d["model"]["device"] = "cuda"
    summary = run_job(spec_from_dict(d), show_bar=False)
    assert summary.state == "succeeded" and summary.shards_done == 3
