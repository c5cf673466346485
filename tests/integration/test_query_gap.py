"""The gap text queries see (kscale/analysis/qgap.py) against references it did not compute.

- pre-RoPE expected logits: brute force over every (text query, key) pair of raw arrays read with zarr;
- post-RoPE expected logits: the pre-softmax logits ``q·k·scaling`` of the model's own eager attention, averaged
  over the (text query, key) pairs within each sample at the stored tokens' positions, pooled with pair weights;
- the span share: 1 for a key difference planted in the text queries' span, 0 for one planted orthogonal.

Legend: T tokens, H heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import kscale.store
from kscale.analysis import qgap
from kscale.data import open_source
from kscale.extract import worker
from kscale.models import load_model
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.store.layout import shard_dir
from kscale.store.queries import query_heads
from tests.conftest import extract_spec
from tests.unit.attention.conftest import eager_reference

N_SAMPLES = 3


@pytest.fixture(scope="module")
def qstore(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qgap")
    d = extract_spec(tmp, data={"generated": {"n_samples": N_SAMPLES, "image_size": 112}, "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32",
                              "sample_tokens": {"image": 7, "text": 6}, "attention": {"store_queries": True}},
                     output={"chunk_tokens": 4})
    d["model"]["device"] = "cpu"
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    return spec, kscale.store.open(spec.output.path)


def _raw(store, kind: str, modality: str) -> np.ndarray:
    """(L, N, H, D) concatenated over shards, straight from the shards' Zarr arrays
    (``<modality>/keys``, ``queries/<modality>/queries``)."""
    parts = []
    for r in store.shards.values():
        if r["tokens"][modality]:
            g = zarr.open_group(str(shard_dir(store.path, r["name"])), mode="r")
            path = f"{modality}/keys" if kind == "keys" else f"queries/{modality}/queries"
            parts.append(np.asarray(g[path][:]))
    return np.concatenate(parts, axis=1).astype(np.float64)


def test_query_gap_equals_brute_force_and_model_logits(qstore, monkeypatch):
    spec, store = qstore
    assert qgap.has_queries(store)
    m = store.attrs["model"]
    G, D = m["num_heads"] // m["num_kv_heads"], store.head_dim
    table = qgap.query_gap(store, store.layers, n_buckets=16, seed=0)
    assert len(table) == len(store.layers) * len(store.heads)
    tok = {mod: store.tokens(mod) for mod in ("text", "image")}

    # pre-RoPE: every (text query, key) pair of the store, queries of the KV head's group
    for li, layer in enumerate(store.layers):
        q = _raw(store, "queries", "text")[li]
        k = {mod: _raw(store, "keys", mod)[li] for mod in ("text", "image")}
        for h, head in enumerate(store.heads):
            row = table[(table.layer == layer) & (table["head"] == head)].iloc[0]
            qs = q[:, h * G:(h + 1) * G].reshape(-1, D)
            for mod in ("image", "text"):
                want = (qs @ k[mod][:, h].T).mean() / math.sqrt(D)
                assert row[f"logit_{mod}_pre"] == pytest.approx(want, rel=1e-9, abs=1e-9)
            assert row["gap_pre_ci_low"] <= row["gap_pre"] <= row["gap_pre_ci_high"]

    # post-RoPE: the eager model's own logits at the stored positions, pairs within samples
    eager = load_model(dataclasses.replace(spec.model, attn_implementation="eager"))
    source = open_source(spec.data)
    heads_q = query_heads(store.heads, m["num_heads"], m["num_kv_heads"])
    sums = {}  # (layer, kv head, modality) -> [sum of logits, pairs]
    for sid in range(N_SAMPLES):
        rec = source.get(sid)
        ref = eager_reference(eager, eager.adapter.build_batch(eager, [rec.image], [rec.text]), monkeypatch)
        pq = tok["text"]["position"][tok["text"]["sample_id"] == sid]
        for layer in store.layers:
            logits_HTT = ref.logits_LBHTT[layer][0]
            for h, head in enumerate(store.heads):
                for mod in ("image", "text"):
                    pk = tok[mod]["position"][tok[mod]["sample_id"] == sid]
                    block = logits_HTT[heads_q[h * G:(h + 1) * G]][:, pq][:, :, pk]
                    acc = sums.setdefault((layer, head, mod), [0.0, 0])
                    acc[0] += block.sum()
                    acc[1] += block.size
    scaling = eager.adapter.decoder_layers(eager.model)[0].self_attn.scaling
    assert scaling == pytest.approx(1 / math.sqrt(D))  # the model scales as qgap does
    for (layer, head, mod), (total, n) in sums.items():
        row = table[(table.layer == layer) & (table["head"] == head)].iloc[0]
        assert row[f"logit_{mod}_post"] == pytest.approx(total / n, rel=1e-5, abs=1e-6)
    # RoPE matters: post differs from pre somewhere
    assert np.abs(table["logit_image_post"] - table["logit_image_pre"]).max() > 1e-4


def test_span_share_planted_inside_and_orthogonal():
    rng = np.random.default_rng(0)
    D, r = 16, 5
    basis, _ = np.linalg.qr(rng.normal(size=(D, D)))
    q_ND = rng.normal(size=(400, r)) * np.linspace(3, 1, r) @ basis[:, :r].T  # queries in a 5-d subspace
    qq = q_ND.T @ q_ND
    inside = basis[:, :r] @ rng.normal(size=r)
    outside = basis[:, r:] @ rng.normal(size=D - r)
    share, dims = qgap.span_share(qq, inside)
    assert share == pytest.approx(1.0, abs=1e-9) and dims == r
    assert qgap.span_share(qq, outside)[0] == pytest.approx(0.0, abs=1e-9)
    assert qgap.span_share(qq, inside + outside)[0] == pytest.approx(
        inside @ inside / ((inside + outside) @ (inside + outside)), abs=1e-9)


def test_analysis_writes_the_table_the_section_and_the_verdict_sentence(qstore, tmp_path):
    from kscale.analysis.run import analyze
    from kscale.spec.analyze import AnalyzeConfig, EmbedConfig, MMDConfig, SignificanceConfig

    _, store = qstore
    cfg = AnalyzeConfig(stores=[store.path], layers=[1], estimators=["mmd_rf"], comparisons=["cross"],
                        mmd=MMDConfig(n_features=32, median_subsample=50), exact_subsample=20,
                        significance=SignificanceConfig(n_buckets=8, permutations=0), embed=EmbedConfig(methods=[]))
    analyze(cfg, tmp_path / "run", stores=[store])
    csv = tmp_path / "run" / f"query_gap_{Path(store.path).name}.csv"
    table = pd.read_csv(csv)
    want = qgap.query_gap(store, [1], n_buckets=8, seed=cfg.seed)
    assert list(table.layer) == [1] * len(store.heads)
    np.testing.assert_allclose(table["gap_post"], want["gap_post"], rtol=1e-12)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "What text queries see" in html
    assert "Seen from text queries (post-RoPE, as the model scores)" in html.split("<h2>")[0]  # in the verdict box


def test_query_gap_scales_logits_as_the_store_records_and_falls_back_to_one_over_sqrt_d(qstore, monkeypatch):
    """The extraction records the model's scale (``kscale.store.scaling.SCALE_ATTRIBUTE``; 1/sqrt(D) for this
    model) and the logits use it; without the attribute (older stores) they are scaled by 1/sqrt(D); with
    another scale recorded every logit and gap is scaled by it instead."""
    import copy

    from kscale.store.scaling import SCALE_ATTRIBUTE, attention_scale

    _, store = qstore
    D = store.head_dim
    assert attention_scale(store.attrs, D) == (1 / math.sqrt(D), "store")
    recorded = qgap.query_gap(store, store.layers[:1], n_buckets=16, seed=0)
    assert set(recorded.scale_source) == {"store"}
    attrs = copy.deepcopy(store.attrs)
    del attrs["model"][SCALE_ATTRIBUTE]
    monkeypatch.setattr(store, "attrs", attrs)
    assert attention_scale(store.attrs, D) == (1 / math.sqrt(D), "1/sqrt(head_dim)")
    base = qgap.query_gap(store, store.layers[:1], n_buckets=16, seed=0)
    assert (base.logit_scale == 1 / math.sqrt(D)).all() and set(base.scale_source) == {"1/sqrt(head_dim)"}
    np.testing.assert_allclose(recorded.gap_post, base.gap_post, rtol=1e-12)
    attrs = copy.deepcopy(attrs)
    attrs["model"][SCALE_ATTRIBUTE] = 0.125
    monkeypatch.setattr(store, "attrs", attrs)
    got = qgap.query_gap(store, store.layers[:1], n_buckets=16, seed=0)
    assert set(got.scale_source) == {"store"} and (got.logit_scale == 0.125).all()
    ratio = 0.125 * math.sqrt(D)
    for col in ("logit_image_pre", "logit_text_post", "gap_pre", "gap_post", "gap_post_ci_high"):
        np.testing.assert_allclose(got[col], base[col] * ratio, rtol=1e-12)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    """Every token stored (no sample_tokens), queries stored, attention statistics of after-image text queries."""
    tmp = tmp_path_factory.mktemp("qgap_full")
    d = extract_spec(tmp, data={"generated": {"n_samples": N_SAMPLES, "image_size": 112}, "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32",
                              "attention": {"enabled": True, "queries": "after_image", "store_queries": True}})
    d["model"]["device"] = "cpu"
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    return kscale.store.open(spec.output.path)


def test_causal_logit_means_equal_the_attention_statistics_stored_at_extraction(full_store):
    """The quantity qgap and the attention statistics both compute: per sample, query head and key modality, the
    mean post-RoPE logit over (after-image text query, visible key) pairs. From the stored q and k it equals the
    extraction's ``logit_mean`` (computed beside the forward pass from the hooked projections)."""
    from kscale.attention.stats import flat_columns

    store = full_store
    m = store.attrs["model"]
    heads_q = query_heads(store.heads, m["num_heads"], m["num_kv_heads"])
    att = pd.DataFrame({k: np.asarray(v) for k, v in flat_columns(dict(store.table("attention"))).items()})
    checked = 0
    for layer in store.layers:
        got = qgap.causal_logit_means(store, layer)
        assert len(got) and (got.n_pairs > 0).all()
        for r in got.itertuples():
            ref = att[(att.sample_id == r.sample_id) & (att.layer == layer) & (att.q_head == heads_q[r.q_index])]
            assert len(ref) == 1, (r, len(ref))
            assert r.logit_mean == pytest.approx(float(ref[f"logit_mean_{r.modality}"].iloc[0]), rel=1e-4, abs=1e-5)
            checked += 1
    assert checked == len(store.layers) * N_SAMPLES * len(heads_q) * 2
