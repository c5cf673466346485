"""q, k and v as peers in one store: spec, writer, reader, verify, info and ``analyze.vector``.

Stores here are written through the real ``ShardWriter`` with planted numbers (no model); what is read back
is compared with what was written. The model-side proofs (stored q/v are the model's projections, q·k its
logits) are in tests/integration/test_vectors_extract.py.

Legend: L layers, N tokens, H KV heads, G query heads per KV head, D head dim.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import kscale.store
from kscale.models.facts import attention_scaling
from kscale.spec import SpecError, spec_from_dict
from kscale.store.layout import STORE_FORMAT
from kscale.store.reader import StoreDamaged, StoreError
from kscale.store.verify import repair, verify_store
from kscale.store.writer import ShardWriter

L, H, G, D, R = 2, 2, 2, 8, 1
LAYERS = [3, 5]
SHIFT_V = 1.5  # image values shifted along dim 0; keys and queries of both modalities from one distribution


def _rows(s: int, modality: str, n_samples: int, per_sample: int, kinds=("q", "v")):
    rng = np.random.default_rng([s, len(modality)])
    n = n_samples * per_sample
    vec = {"k": rng.standard_normal((L, n, H, D)), "q": rng.standard_normal((L, n, H * G, D)),
           "v": rng.standard_normal((L, n, H, D))}
    if modality == "image":
        vec["v"][..., 0] += SHIFT_V
    cols = {"sample_id": np.repeat(np.arange(s * n_samples, (s + 1) * n_samples), per_sample).astype("int64"),
            "position": np.tile(np.arange(per_sample), n_samples).astype("int32"),
            "rope_pos": np.tile(np.arange(per_sample), n_samples).astype("int32"),
            "token_id": np.zeros(n, "int32"),
            "image_index": (np.zeros(n) if modality == "image" else -np.ones(n)).astype("int16")}
    return {k: v.astype("float16") for k, v in vec.items() if k == "k" or k in kinds}, cols


def _llama_config() -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=H * G * D, num_attention_heads=H * G, num_key_value_heads=H, head_dim=D,
                       num_hidden_layers=6, intermediate_size=16, vocab_size=32).to_dict()


def make_store(path, n_shards: int = 3, n_samples: int = 2, per_sample: dict | None = None,
               kinds=("q", "k", "v"), shard_kinds=None, chunk: int = 4) -> str:
    """A store holding ``kinds``; ``shard_kinds`` (shard -> kinds) writes some shards with other kinds."""
    per_sample = per_sample or {"text": 3, "image": 5}
    g = zarr.open_group(str(path), mode="w")
    g.attrs.update({"format": STORE_FORMAT, "version": 2, "layers": LAYERS, "heads": [0, 1], "head_dim": D,
                    "key_dtype": "float16", "rope_rows": R, "plan": {"n_shards": n_shards}, "vectors": list(kinds),
                    "model": {"num_heads": H * G, "num_kv_heads": H, "attention_scaling": D ** -0.5,
                              "config": _llama_config()}})  # RoPE for the query-gap section
    for s in range(n_shards):
        ks = (shard_kinds or {}).get(s, kinds)
        w = ShardWriter(path, f"s{s:06d}", n_layers=L, n_heads=H, head_dim=D, rope_rows=R, key_dtype="float16",
                        chunk_tokens=chunk, vectors=tuple(k for k in ks if k != "k"))
        for m, n in per_sample.items():
            vec, cols = _rows(s, m, n_samples, n, ks)
            w.append(m, vec.pop("k"), cols, vec)
        w.commit({"shard": f"s{s:06d}", "n_samples": n_samples, "n_samples_ok": n_samples, "n_errors": 0}, [])
    return str(path)


def written(kind: str, modality: str, n_shards: int = 3, n_samples: int = 2, n: int = 5) -> np.ndarray:
    return np.concatenate([_rows(s, modality, n_samples, n)[0][kind] for s in range(n_shards)], axis=1)


# ----------------------------------------------------------------------------- spec


def _spec(**extract):
    return spec_from_dict({"kind": "extract", "model": {"path": "debug:qwen2_5_vl"},
                           "data": {"source": "generated"}, "output": {"path": "/tmp/unused"}, "extract": extract})


def test_spec_vectors_default_alias_and_errors():
    assert _spec().extract.vectors == ["k"] and _spec().extract.kinds == ("k",)
    assert _spec(vectors=["v", "k"]).extract.kinds == ("k", "v")
    assert _spec(attention={"store_queries": True}).extract.kinds == ("q", "k")  # the old switch adds q
    assert _spec(vectors=["k", "q"], attention={"store_queries": True}).extract.kinds == ("q", "k")
    with pytest.raises(SpecError, match=r"extract.vectors: \['q', 'v'\] lacks k"):
        _spec(vectors=["q", "v"])
    with pytest.raises(SpecError, match=r"extract.vectors\[1\]: 'x' is not one of"):
        _spec(vectors=["k", "x"])
    with pytest.raises(SpecError, match="extract.vectors: duplicate"):
        _spec(vectors=["k", "k"])


# ----------------------------------------------------------------------------- writer and reader


def test_every_kind_reads_back_what_was_written(tmp_path):
    ks = kscale.store.open(make_store(tmp_path / "s"))
    assert ks.vector_kinds == ("q", "k", "v")
    for m in ("text", "image"):
        n = {"text": 3, "image": 5}[m]
        for kind in "qkv":
            want = written(kind, m, n=n)
            for li, layer in enumerate(LAYERS):
                got = ks.vectors(kind, layer, m).compute()
                np.testing.assert_array_equal(got, want[li])
        assert ks.vectors("k", 5, m).shape == ks.keys(5, m).shape  # keys: the shorthand
    # heads: query heads for q (the model's ids), KV heads for v
    np.testing.assert_array_equal(ks.vectors("q", 3, "image", heads=[3, 0]).compute(),
                                  written("q", "image")[0][:, [3, 0]])
    np.testing.assert_array_equal(ks.vectors("v", 5, "image", heads=[1]).compute(), written("v", "image")[1][:, [1]])
    np.testing.assert_array_equal(ks.queries(5, "text").compute(), written("q", "text", n=3)[1])
    with pytest.raises(StoreError, match=r"query heads \[4\] are not in store"):
        ks.vectors("q", 3, "image", heads=[4])
    with pytest.raises(StoreError, match="values carry no RoPE"):
        ks.vectors("v", 3, "image", rope=True)
    with pytest.raises(StoreError, match="unknown vector kind 'x'"):
        ks.vectors("x", 3, "image")


def test_q_and_v_files_are_laid_out_and_committed_like_keys(tmp_path):
    path = make_store(tmp_path / "s", chunk=4)
    marker = json.loads((tmp_path / "s" / "shards" / "s000001.done.json").read_text())
    assert marker["groups"] == ["image", "queries", "text", "values"]
    for array in ("image/keys", "queries/image/queries", "values/image/values"):
        meta = json.loads((tmp_path / "s" / "shards" / "s000001" / array / "zarr.json").read_text())
        assert meta["shape"][:2] == [L, 10] and meta["chunk_grid"]["configuration"]["chunk_shape"][:2] == [L, 4]
        assert [f"{array}/c.0.{i}.0.0" in marker["files"] for i in range(3)] == [True] * 3  # 10 rows, chunks of 4
        assert f"{array}/zarr.json" in marker["meta_crc32c"]
    assert marker["vector_bytes"] == {"q": L * 16 * H * G * D * 2, "v": L * 16 * H * D * 2}
    summ = kscale.store.open(path).summary()
    assert summ["vectors"] == ["q", "k", "v"] and summ["query_heads"] == [0, 1, 2, 3]


def test_a_store_without_a_kind_says_so(tmp_path):
    ks = kscale.store.open(make_store(tmp_path / "a", kinds=("k", "v")))
    with pytest.raises(StoreError, match="holds no q vectors"):
        ks.vectors("q", 3, "text")
    ks = kscale.store.open(make_store(tmp_path / "b", shard_kinds={1: ("k", "q")}))
    with pytest.raises(StoreError, match="shard s000001 .* has no stored values"):
        ks.vectors("v", 3, "text")


def test_coarse_reads_of_a_kind_equal_its_lazy_array(tmp_path):
    from kscale.store.queries import VectorView

    ks = kscale.store.open(make_store(tmp_path / "s"))
    for kind in "qv":
        view = VectorView(ks, kind)
        full = view.keys(5, "image").compute()
        got = view.keys_rows(5, "image", 3, 27).compute()
        np.testing.assert_array_equal(got, full[3:27])
        idx = np.array([29, 0, 7, 7, 12])
        np.testing.assert_array_equal(view.keys_at(5, "image", idx), full[idx])
        np.testing.assert_array_equal(view.keys_at(5, "image", idx, heads=[view.heads[-1]]), full[idx][:, [-1]])
    assert VectorView(ks, "q").heads == [0, 1, 2, 3] and VectorView(ks, "v").heads == [0, 1]


# ----------------------------------------------------------------------------- verify and repair


def _flip(path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("array", ["values/text/values", "queries/image/queries"])
def test_a_damaged_q_or_v_chunk_is_found_read_and_verified(tmp_path, array):
    path = make_store(tmp_path / "s")
    _flip(tmp_path / "s" / "shards" / "s000002" / array / "c.0.0.0.0")
    kind, m = ("v", "text") if array.startswith("values") else ("q", "image")
    ks = kscale.store.open(path)
    with pytest.raises(StoreDamaged, match=f"s000002/{array} chunk c.0.0.0.0"):
        for layer in LAYERS:  # the flipped byte is in one layer's inner chunk
            ks.vectors(kind, layer, m).compute()
    ks.vectors("k", 3, m).compute()  # keys of that shard are sound
    damage = verify_store(path)
    assert [(d.shard, d.array) for d in damage] == [("s000002", array)]
    assert repair(path, damage) == ["s000002"]
    assert sorted(kscale.store.open(path).shards) == ["s000000", "s000001"]


def test_verify_finds_a_shard_missing_a_kind_the_store_holds(tmp_path):
    """A shard committed without the store's q (a writer that dropped it) is damage, not a silent gap."""
    path = make_store(tmp_path / "s", shard_kinds={1: ("k", "v")})
    damage = verify_store(path)
    assert {(d.shard, d.array) for d in damage} == {("s000001", "queries/text/queries"),
                                                    ("s000001", "queries/image/queries")}
    assert all("lists no queries" in d.reason for d in damage)


# ----------------------------------------------------------------------------- attention scaling


def test_attention_scaling_is_the_attention_modules_own():
    """From the config alone, what transformers' attention modules multiply q·k by (Gemma 3's
    query_pre_attn_scalar, not head_dim), and Gemma 2's logit soft cap."""
    from transformers import Gemma2Config, Gemma3TextConfig, Qwen2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1, vocab_size=32)
    for cfg, cls in ((Gemma3TextConfig(**small, head_dim=16, query_pre_attn_scalar=144), Gemma3Attention),
                     (Gemma2Config(**small, head_dim=16, query_pre_attn_scalar=100), Gemma2Attention),
                     (Qwen2Config(**small), Qwen2Attention)):
        got = attention_scaling(cfg.to_dict())
        assert got["attention_scaling"] == pytest.approx(cls(cfg, 0).scaling, rel=1e-12), cls
        assert got.get("attn_logit_softcapping") == getattr(cfg, "attn_logit_softcapping", None)
    assert attention_scaling(Gemma3TextConfig(**small, head_dim=16, query_pre_attn_scalar=144).to_dict()) == {
        "attention_scaling": 1 / 12}


# ----------------------------------------------------------------------------- analyze.vector


def _analyze(store: str, out, vector: str, estimators=("mmd_rf", "mmd_exact", "jsd_hist", "jsd_clf")):
    from kscale.analysis.run import analyze
    from kscale.spec.analyze import AnalyzeConfig, EmbedConfig, JSDConfig, MMDConfig, SignificanceConfig

    cfg = AnalyzeConfig(stores=[store], vector=vector, estimators=list(estimators), mmd=MMDConfig(n_features=128, median_subsample=300),
                        exact_subsample=150, jsd=JSDConfig(epochs=1, min_steps=40, mlp_hidden=16, n_random=4),
                        significance=SignificanceConfig(n_buckets=8, permutations=99),
                        embed=EmbedConfig(methods=[]))
    return analyze(cfg, out)


def _values_gap(tmp_path, n_shards: int, n_samples: int, estimators: tuple[str, ...]) -> None:
    """A store whose values carry an image/text gap that its keys do not: the analysis of v finds it beside
    its intra-modal baseline, the analysis of k does not; the table and the report say which kind."""
    path = make_store(tmp_path / "s", n_shards=n_shards, n_samples=n_samples, per_sample={"text": 12, "image": 16},
                      chunk=64)
    rows = {}
    for vector in ("v", "k"):
        df = _analyze(path, tmp_path / vector, vector, estimators if vector == "v" else ("mmd_rf",))
        assert set(df["vector"]) == {vector}
        rf = df[(df.estimator == "mmd2_rf") & (df.kernel == "rbf") & (df.normalisation == "none")
                & (df.multiple == 1.0) & (df["head"] == -1)]
        rows[vector] = {c: rf[rf.comparison == c].sort_values("layer") for c in ("cross", "intra_text")}
        report = (tmp_path / vector / "report.html").read_text()
        assert f"Vectors compared: <b>{ {'v': 'values', 'k': 'keys'}[vector]}</b>" in report
        if vector == "v" and "jsd_clf" in estimators:
            assert {"jsd_hist_marginal", "jsd_clf_logistic", "mmd2_exact"} <= set(df.estimator)
    v, k = rows["v"], rows["k"]
    assert len(v["cross"]) == L
    assert (v["cross"].value.values > v["intra_text"].value.values + 3 * v["cross"].se.values).all()
    assert (v["cross"].p <= 0.05).all()
    assert (k["cross"].value.values < v["cross"].value.values / 5).all()


def test_analyze_vector_v_runs_on_the_values(tmp_path):
    _values_gap(tmp_path, n_shards=4, n_samples=4, estimators=("mmd_rf",))


@pytest.mark.slow
def test_analyze_vector_v_on_a_demo_sized_store(tmp_path):
    """Demo-sized (64 samples in 8 shards, 2 layers, 2 KV heads), every estimator."""
    _values_gap(tmp_path, n_shards=8, n_samples=8, estimators=("mmd_rf", "mmd_exact", "jsd_hist", "jsd_clf"))


def test_analyze_vector_q_compares_query_heads_and_refuses_a_store_without_them(tmp_path):
    path = make_store(tmp_path / "s", n_shards=2, n_samples=4, kinds=("k", "v"))
    with pytest.raises(ValueError, match=r"stores: \[0\] .* holds no q vectors .*analyze.vector"):
        _analyze(path, tmp_path / "a", "q")
    path = make_store(tmp_path / "t", n_shards=2, n_samples=4)
    df = _analyze(path, tmp_path / "b", "q", ("mmd_rf",))
    assert sorted(set(df["head"])) == [-1, 0, 1, 2, 3] and set(df["vector"]) == {"q"}
