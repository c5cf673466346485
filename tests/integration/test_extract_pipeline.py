"""The pipelined extraction path and models spread over devices write exactly the reference store.

The reference is the synchronous path (``ExtractState.overlap = False``): full projection outputs to
the host, then select, cast and write. The pipelined path selects and casts where the layer ran, copies
to the host behind the forward, and writes and commits on the drain thread. A model spread over two
"devices" on a CPU machine uses the same ``device_map`` loading as a multi-GPU worker, with plan device 1
offloaded to disk (accelerate's dispatch hooks move each layer's weights in for its forward).

Legend: L layers, N tokens, H kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import zarr

from kscale.data import open_source, plan_shards
from kscale.extract import worker
from kscale.models import load_model
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from tests.conftest import extract_spec

SAMPLED = {"batch_size": 3, "key_dtype": "float16", "layers": [0, -1], "heads": [1],
           "sample_tokens": {"text": 5, "image": 7, "seed": 3}}


def shard_arrays(store: str | Path) -> dict[str, bytes]:
    """Every array of every shard (path -> dtype + shape + raw bytes), and every marker's token counts."""
    out: dict[str, bytes] = {}
    root = Path(store) / "shards"
    for shard in sorted(p for p in root.iterdir() if p.is_dir()):
        g = zarr.open_group(str(shard), mode="r")
        for path, arr in g.members(max_depth=None):
            if not isinstance(arr, zarr.Array):
                continue
            a = arr[...]
            out[f"{shard.name}/{path}"] = f"{a.dtype}{a.shape}".encode() + a.tobytes()
    for marker in sorted(root.glob("*.done.json")):
        out[marker.name] = marker.read_bytes().split(b'"seconds"')[0]
    return out


def run_state(spec, state, store: Path) -> None:
    """Every shard of ``spec`` through ``state`` into ``store`` (a copy of a store's root metadata)."""
    into = dataclasses.replace(spec, output=dataclasses.replace(spec.output, path=str(store)))
    for shard in plan_shards(len(open_source(spec.data)), spec.data.shard_size):
        worker.run_shard(into, shard, state)


@pytest.mark.parametrize("model", ["debug:qwen2_5_vl", "debug:llava"])
@pytest.mark.parametrize("extract", [{"batch_size": 4, "key_dtype": "float32"}, SAMPLED], ids=["all", "sampled"])
def test_pipelined_path_writes_the_synchronous_store(tmp_path, model, extract):
    spec = spec_from_dict(extract_spec(tmp_path, model=model, extract=extract))
    run_job(spec, show_bar=False)  # the pipelined path, through the local executor
    ref = tmp_path / "sync"
    shutil.copytree(spec.output.path, ref, ignore=shutil.ignore_patterns("shards"))
    (ref / "shards").mkdir()
    state = worker.setup(spec)
    state.overlap = False
    run_state(spec, state, ref)
    a, b = shard_arrays(spec.output.path), shard_arrays(ref)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert a[k] == b[k], k


def test_model_split_over_two_devices_writes_the_same_store(tmp_path):
    spec = spec_from_dict(extract_spec(tmp_path, extract=SAMPLED | {"layers": "all", "heads": "all"}))
    run_job(spec, show_bar=False)
    split = tmp_path / "split"
    shutil.copytree(spec.output.path, split, ignore=shutil.ignore_patterns("shards"))
    (split / "shards").mkdir()
    base = worker.setup(spec)
    loaded = load_model(spec.model, n_devices=2, devices=["cpu", "disk"])
    placed = {str(d) for d in loaded.model.hf_device_map.values()}
    assert placed == {"cpu", "disk"}, loaded.model.hf_device_map
    state = worker.ExtractState(loaded, base.layers, base.heads, base.source)
    run_state(spec, state, split)
    a, b = shard_arrays(spec.output.path), shard_arrays(split)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


@pytest.mark.parametrize("overlap", [True, False], ids=["pipelined", "sync"])
@pytest.mark.parametrize("scale,message", [(float("nan"), "non-finite key values in"), (1e9, "keys overflow float16")])
def test_bad_key_values_fail_the_shard_before_its_marker(tmp_path, overlap, scale, message):
    import torch

    spec = spec_from_dict(extract_spec(tmp_path, extract={"batch_size": 4, "key_dtype": "float16"}))
    state = worker.setup(spec)
    state.overlap = overlap
    with torch.no_grad():
        state.loaded.adapter.key_modules(state.loaded.model)[1].weight.mul_(scale)
    shard = plan_shards(len(state.source), spec.data.shard_size)[0]
    with pytest.raises(ValueError, match=message):
        worker.run_shard(spec, shard, state)
    shards = Path(spec.output.path) / "shards"
    assert not (shards / f"{shard.name}.done.json").exists()
    # the failed attempt gave its staging folder (and owner record) up at once, not when its writer is collected
    assert not list(shards.glob(f".{shard.name}.tmp-*")), sorted(p.name for p in shards.iterdir())


@pytest.mark.slow  # ~100 s on 2 shared cores (two Ray actors load the model); the executor logic is also
# checked fast by tests/integration/test_executors.py::test_ray_actors_overlap_commits_and_report_after_them
def test_ray_actors_pipeline_write_the_local_store_and_redo_a_failed_background_commit(tmp_path, ray_local):
    """Through a Ray actor (shard k commits behind shard k+1's forwards) the store equals the local run's;
    a commit that fails on the actor's drain thread leaves its shard without a marker, and a rerun redoes
    exactly that shard."""
    from kscale.executors.ray import RayExecutor
    from kscale.extract.run import run_extract
    from tests.integration.failing_commit_stage import VICTIM

    local = spec_from_dict(extract_spec(tmp_path / "local", extract=SAMPLED))
    run_job(local, show_bar=False)
    spec = spec_from_dict(extract_spec(tmp_path / "ray", extract=SAMPLED,
                                       resources={"executor": "ray", "workers": 1, "max_retries": 0}))
    first = run_extract(spec, RayExecutor("tests.integration.failing_commit_stage", show_bar=False))
    assert first.shards_done == 2 and first.shards_failed == 1 and list(first.quarantined) == [VICTIM], first
    assert "background commit of s000001 failed" in first.quarantined[VICTIM]
    markers = {p.name for p in (Path(spec.output.path) / "shards").glob("*.done.json")}
    assert markers == {"s000000.done.json", "s000002.done.json"}
    again = run_extract(spec, RayExecutor("tests.integration.failing_commit_stage", show_bar=False))
    assert again.shards_done == 1 and again.shards_skipped == 2 and again.shards_failed == 0, again
    a, b = shard_arrays(local.output.path), shard_arrays(spec.output.path)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert a[k] == b[k], k
