"""Stored query vectors: same rows as the keys, pre-RoPE q_proj outputs, and post-RoPE on request equal to
the queries the model's eager attention receives.

The extraction worker does not write queries yet (wiring pending), so this test replays the worker's
batches through ``QueryWriter`` into the committed shards of a real extraction store.

Legend: T tokens, H query heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import kscale.store
from kscale.attention.queries import QueryWriter, query_heads, read_queries
from kscale.data import open_source
from kscale.extract import worker
from kscale.models import load_model
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.store.layout import MODALITIES
from tests.conftest import extract_spec
from tests.unit.attention.conftest import eager_reference


def test_stored_queries_match_keys_rows_and_model_queries(tmp_path, monkeypatch):
    d = extract_spec(tmp_path, data={"generated": {"n_samples": 3, "image_size": 112}, "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32", "heads": [1],
                              "sample_tokens": {"image": 6, "text": 5}})
    d["model"]["device"] = "cpu"
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    state = worker.setup(spec)
    source = open_source(spec.data)
    store = kscale.store.open(spec.output.path)
    for shard, marker in store.shards.items():  # replay the worker's batches of each shard
        qw = QueryWriter(store.path, shard, dtype="float32", chunk_tokens=3)  # tiny chunks: several flushes
        recs = [source.get(i) for i in range(marker["start"], marker["stop"])]
        for a in range(0, len(recs), spec.extract.batch_size):
            batch_recs = recs[a:a + spec.extract.batch_size]
            batch = worker.build(state, batch_recs)
            cap = worker.forward_capture(state, batch, queries=True)
            keep = worker._keep_mask(batch.modality_BT, [r.sample_id for r in batch_recs], spec.extract.sample_tokens)
            qw.append_batch(spec, state, batch, batch_recs, cap, keep)
        qw.close()

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
                q_pre = read_queries(store, layer, m).compute()
                q_post = read_queries(store, layer, m, rope=True).compute()
                assert len(q_pre) == len(tok["sample_id"]) == store.keys(layer, m).shape[0]  # rows of the keys
                np.testing.assert_allclose(q_post[sel], want_THD[tok["position"][sel]], atol=1e-5, rtol=0)
                if m == "image":  # RoPE really rotated them
                    assert np.abs(q_pre[sel] - q_post[sel]).max() > 1e-3
    assert (store.tokens("image")["sample_id"] == 0).sum() == 6  # sampling applied, queries followed it
