"""Attention through a real extraction job: the stored attention table against the eager model, and
post-RoPE keys rebuilt by the reader against the model's KV cache.

Legend: T tokens, H kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

import kscale.store
from kscale.attention.stats import flat_columns
from kscale.models import load_model
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.store.layout import MODALITIES
from kscale.store.rope import rope_keys, store_rotary
from tests.conftest import extract_spec
from tests.unit.attention.conftest import STAT_NAMES, eager_reference, reference_queries, reference_stats


@pytest.fixture(scope="module", params=["debug:qwen2_5_vl", "debug:llava"])
def attn_store(request, tmp_path_factory):
    """4 samples, batches of 3 (right padding), 2 shards, attention statistics on."""
    tmp = tmp_path_factory.mktemp(request.param.split(":")[1])
    d = extract_spec(
        tmp, model=request.param, data={"generated": {"n_samples": 4, "image_size": 112}, "shard_size": 3},
        extract={"batch_size": 3, "key_dtype": "float32", "attention": {"enabled": True, "query_chunk": 4}})
    d["model"]["device"] = "cpu"  # the references below run on CPU too
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    return spec, kscale.store.open(spec.output.path)


def sample_batch(spec, lm, sample_id: int):
    from kscale.data import open_source

    rec = open_source(spec.data).get(sample_id)
    return lm.adapter.build_batch(lm, [rec.image], [rec.text])


def test_rope_keys_equal_kv_cache(attn_store):
    spec, store = attn_store
    lm = load_model(spec.model)
    rotary = store_rotary(store)
    for sid in (0, 3):
        batch = sample_batch(spec, lm, sid)
        with torch.no_grad():
            cache = lm.model(**batch.inputs, use_cache=True).past_key_values
        for layer in store.layers:
            cached_THD = cache.layers[layer].keys[0].transpose(0, 1).numpy()  # (1, H, T, D) -> (T, H, D)
            n_rows = 0
            for m in MODALITIES:
                sel = store.tokens(m)["sample_id"] == sid
                if not sel.any():
                    continue
                got = rope_keys(store, layer, m, rotary=rotary).compute()[sel]
                np.testing.assert_allclose(got, cached_THD[store.tokens(m)["position"][sel]], atol=1e-5, rtol=0)
                n_rows += int(sel.sum())
            assert n_rows == cached_THD.shape[0]
    if store.attrs["rope_rows"] == 3:  # Qwen: 3-D M-RoPE positions really differ on image rows
        rope_pos = store.tokens("image")["rope_pos"]
        assert (rope_pos[:, 1] != rope_pos[:, 2]).any()
    pre = store.keys(store.layers[0], "image").compute()
    post = rope_keys(store, store.layers[0], "image", rotary=rotary).compute()
    assert np.abs(pre - post).max() > 1e-2  # the rotation is not the identity on these positions


def test_attention_table_equals_eager_attention(attn_store, monkeypatch):
    spec, store = attn_store
    raw = store.table("attention")
    assert raw["mass"].shape == (len(raw["sample_id"]), 4)  # (n, M) columns survive the store
    table = flat_columns(raw)
    L, Hq = len(store.layers), store.attrs["model"]["num_heads"]
    assert len(table["sample_id"]) == 4 * L * Hq and set(STAT_NAMES) <= set(table)
    eager = load_model(dataclasses.replace(spec.model, attn_implementation="eager"))
    for sid in range(4):
        batch = sample_batch(spec, eager, sid)
        ref = eager_reference(eager, batch, monkeypatch)
        queries_B = reference_queries(batch, "after_image", 0)
        for r in np.flatnonzero(table["sample_id"] == sid):
            want = reference_stats(ref, batch, queries_B, int(table["layer"][r]), 0, int(table["q_head"][r]))
            for name in STAT_NAMES:
                np.testing.assert_allclose(table[name][r], want[name], rtol=1e-5, atol=1e-5, equal_nan=True,
                                           err_msg=f"sample {sid} row {r} {name}")
