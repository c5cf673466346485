"""Stored query vectors: same rows as the keys, pre-RoPE q_proj outputs, and post-RoPE on request equal to
the queries the model's eager attention receives.

Queries are written by the extraction job itself (``extract.attention.store_queries``), with tiny chunks
so that the writer flushes several times.

Legend: T tokens, H query heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import kscale.store
from kscale.data import open_source
from kscale.extract import worker
from kscale.models import load_model
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.store.layout import MODALITIES
from kscale.store.queries import query_heads, read_queries
from tests.conftest import extract_spec
from tests.unit.attention.conftest import eager_reference


def test_stored_queries_match_keys_rows_and_model_queries(tmp_path, monkeypatch):
    d = extract_spec(tmp_path, data={"generated": {"n_samples": 3, "image_size": 112}, "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32", "heads": [1],
                              "sample_tokens": {"image": 6, "text": 5}, "attention": {"store_queries": True}},
                     output={"chunk_tokens": 3})
    d["model"]["device"] = "cpu"
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    state = worker.setup(spec)
    source = open_source(spec.data)
    store = kscale.store.open(spec.output.path)

    info = state.loaded.info
    heads = query_heads([1], info.num_heads, info.num_kv_heads)
    eager = load_model(dataclasses.replace(spec.model, attn_implementation="eager"))
    for sid in range(3):
        rec = source.get(sid)
        batch = eager.adapter.build_batch(eager, [rec.image], [rec.text])
        ref = eager_reference(eager, batch, monkeypatch)
        for layer in store.layers:
            want_THD = ref.queries_LBHTD[layer][0][heads].transpose(1, 0, 2)  # post-RoPE, (T, H, D)
            for m in MODALITIES:
                tok = store.tokens(m)
                sel = tok["sample_id"] == sid
                if not sel.any():
                    continue
                q_pre = store.queries(layer, m).compute()
                q_post = read_queries(store, layer, m, rope=True).compute()
                assert len(q_pre) == len(tok["sample_id"]) == store.keys(layer, m).shape[0]  # rows of the keys
                np.testing.assert_allclose(q_post[sel], want_THD[tok["position"][sel]], atol=1e-5, rtol=0)
                if m == "image":  # RoPE really rotated them
                    assert np.abs(q_pre[sel] - q_post[sel]).max() > 1e-3
    assert (store.tokens("image")["sample_id"] == 0).sum() == 6  # sampling applied, queries followed it
