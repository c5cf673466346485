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


def _shard_arrays(store):
    from tests.integration.test_extract_pipeline import shard_arrays

    return shard_arrays(store)


@pytest.mark.parametrize("model", ["debug:qwen2_5_vl", "debug:llava"])
def test_cuda_pipelined_copies_write_the_synchronous_store(tmp_path, model):
    """Side-stream copies into pinned memory give exactly the store of the synchronous path."""
    import shutil

    from kscale.extract import worker
    from tests.integration.test_extract_pipeline import SAMPLED, run_state

    for extract in ({"batch_size": 4, "key_dtype": "float32"}, SAMPLED):
        d = extract_spec(tmp_path / str(len(extract)), model=model, extract=extract)
        d["model"]["device"] = "cuda"
        spec = spec_from_dict(d)
        run_job(spec, show_bar=False)
        ref = tmp_path / f"sync{len(extract)}"
        shutil.copytree(spec.output.path, ref, ignore=shutil.ignore_patterns("shards"))
        (ref / "shards").mkdir()
        state = worker.setup(spec)
        state.overlap = False
        run_state(spec, state, ref)
        a, b = _shard_arrays(spec.output.path), _shard_arrays(ref)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k], k


@pytest.mark.skipif(__import__("torch").cuda.device_count() < 2, reason="needs 2 GPUs")
def test_model_spread_over_two_gpus_writes_the_one_gpu_store(tmp_path):
    from kscale.data import open_source
    from kscale.extract import worker
    from kscale.models import load_model
    from tests.integration.test_extract_pipeline import SAMPLED, run_state

    import shutil

    d = extract_spec(tmp_path, extract=SAMPLED | {"layers": "all", "heads": "all"})
    d["model"]["device"] = "cuda"
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    split = tmp_path / "split"
    shutil.copytree(spec.output.path, split, ignore=shutil.ignore_patterns("shards"))
    (split / "shards").mkdir()
    loaded = load_model(spec.model, n_devices=2)
    assert {str(v) for v in loaded.model.hf_device_map.values()} == {"cuda:0", "cuda:1"}
    base = worker.setup(spec)
    run_state(spec, worker.ExtractState(loaded, base.layers, base.heads, open_source(spec.data)), split)
    a, b = _shard_arrays(spec.output.path), _shard_arrays(split)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


def test_throughput_bench_runs_on_cuda():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "bench" / "extract_throughput.py"), "--layers", "2",
                          "--batches", "2", "--repeats", "1"], capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/s" in out.stdout and "MB/s written" in out.stdout
