"""q, k and v written by the extraction job (``extract.vectors``) against references kscale did not compute.

- Stored q and v equal transformers' own projection outputs, caught by forward hooks this test registers on
  the language model's ``q_proj`` / ``v_proj`` (``q_norm`` in the families that normalise queries), found by
  module name, not through kscale's adapters — on every family, through both extraction paths (the
  pipelined one and the synchronous one taken with attention statistics).
- q·k, both rebuilt post-RoPE from the store and multiplied by the store's recorded ``attention_scaling``,
  equal the logits the model's eager attention computes before its softmax (Qwen2.5-VL and LLaVA).

Legend: T tokens, H heads of the kind, D head dim, S stored rows of one sample.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

import kscale.store
from kscale.data import open_source
from kscale.models import FAMILIES, get_adapter, load_model
from kscale.runner import run_job
from kscale.spec import spec_from_dict
from kscale.store.layout import MODALITIES
from kscale.store.queries import query_heads
from tests.conftest import extract_spec
from tests.unit.attention.conftest import eager_reference

# Families whose attention normalises each query head before RoPE (the stored q is that output), and the
# layout of the norm's output: Qwen3-VL normalises (B, T, H, D), Gemma 3 (B, H, T, D).
Q_NORM = {"qwen3_vl": "BTHD", "qwen3_vl_moe": "BTHD", "gemma3": "BHTD"}
_LM_ATTN = re.compile(r"(?:language_model|text_model)(?:\.model)?\.layers\.(\d+)\.self_attn\.(q_proj|v_proj|q_norm)$")


def _extract(tmp_path, family: str, **extract) -> tuple:
    d = extract_spec(tmp_path, model=f"debug:{family}",
                     data={"generated": {"n_samples": 3, "image_size": 112}, "shard_size": 2},
                     extract={"batch_size": 2, "key_dtype": "float32", "vectors": ["q", "k", "v"],
                              "sample_tokens": {"image": 5, "text": 6}} | extract,
                     output={"chunk_tokens": 3})
    d["model"]["device"] = "cpu"
    spec = spec_from_dict(d)
    run_job(spec, show_bar=False)
    return spec, kscale.store.open(spec.output.path)


def _projection_outputs(lm, batch) -> dict[tuple[str, int], np.ndarray]:
    """(kind, layer) -> (T, H, D) of sample 0: q (q_proj, or q_norm where the family normalises) and v
    (v_proj), from hooks on the modules named like the language model's attention projections."""
    family = lm.info.family
    want = {"q": "q_norm" if family in Q_NORM else "q_proj", "v": "v_proj"}
    out, handles = {}, []
    for name, mod in lm.model.named_modules():
        m = _LM_ATTN.search(name)
        if not m or m.group(2) not in want.values():
            continue
        kind = "q" if m.group(2) == want["q"] else "v"
        n = lm.info.num_heads if kind == "q" else lm.info.num_kv_heads

        def hook(_mod, _inp, o, key=(kind, int(m.group(1))), n=n):
            o = o[0]
            if o.ndim == 3 and Q_NORM.get(family) == "BHTD":
                o = o.transpose(0, 1)
            out[key] = o.reshape(o.shape[0], n, -1).double().numpy()
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            lm.model(**batch.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert sorted(out) == sorted((k, i) for k in "qv" for i in range(lm.info.num_layers)), sorted(out)
    return out


def _check_projections(spec, store, lm, kinds: str = "qv") -> None:
    source = open_source(spec.data)
    info = lm.info
    heads = {"q": query_heads(store.heads, info.num_heads, info.num_kv_heads), "v": store.heads}
    assert store.vector_kinds == tuple(k for k in "qkv" if k in kinds + "k")
    for sid in range(3):
        rec = source.get(sid)
        batch = lm.adapter.build_batch(lm, [rec.image], [rec.text])
        ref = _projection_outputs(lm, batch)
        for m in MODALITIES:
            tok = store.tokens(m)
            sel = tok["sample_id"] == sid
            if not sel.any():
                continue
            for layer in store.layers:
                for kind in kinds:
                    got = store.vectors(kind, layer, m).compute()
                    assert len(got) == len(tok["sample_id"]) == store.keys(layer, m).shape[0]
                    want = ref[(kind, layer)][tok["position"][sel]][:, heads[kind]]
                    np.testing.assert_allclose(got[sel], want, atol=2e-5, rtol=1e-5, err_msg=f"{kind} {m} {layer}")


# the default suite covers one family per way of making q and v (plain, q_norm in either layout, Llama 4's
# v only); the other families run with the slow tests (about 100 s for all of them on 2 cores)
_DEFAULT_FAMILIES = ("qwen2_5_vl", "llava", "qwen3_vl", "gemma3", "llama4")


@pytest.mark.parametrize("family", [f if f in _DEFAULT_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_stored_q_and_v_are_the_models_projections(tmp_path, family):
    """Every family: stored q and v, rows as the keys' rows (token sampling applied), equal the projection
    outputs the model computes; and the recorded attention scaling is the attention modules' own. A family
    without stored queries (Llama 4: ``supports`` lacks them, extraction refuses q) is checked on v."""
    kinds = "qv" if "queries" in get_adapter(family).supports else "v"
    spec, store = _extract(tmp_path, family, vectors=sorted(set(kinds) | {"k"}))
    lm = load_model(dataclasses.replace(spec.model, attn_implementation="eager"))
    _check_projections(spec, store, lm, kinds)
    scalings = {float(layer.self_attn.scaling) for layer in lm.adapter.decoder_layers(lm.model)}
    assert scalings == {store.attrs["model"]["attention_scaling"]}


def test_synchronous_path_writes_the_same_q_and_v(tmp_path):
    """The synchronous path (taken with attention statistics) writes the same q, k and v as the pipelined one."""
    _, piped = _extract(tmp_path / "a", "qwen2_5_vl")
    _, sync = _extract(tmp_path / "b", "qwen2_5_vl", attention={"enabled": True})
    assert "attention" in next(iter(sync.shards.values()))["groups"]
    for kind in "qkv":
        for m in ("text", "image"):
            a, b = piped.vectors(kind, 1, m).compute(), sync.vectors(kind, 1, m).compute()
            assert a.shape == b.shape and a.shape[0] > 0
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_q_dot_k_equals_the_models_logits(tmp_path, family, monkeypatch):
    """Post-RoPE stored q · post-RoPE stored k, times the store's ``attention_scaling``, equal the eager
    attention's logits before softmax, for every pair of stored tokens of a sample."""
    spec, store = _extract(tmp_path, family)
    info = store.attrs["model"]
    G, scale = info["num_heads"] // info["num_kv_heads"], info["attention_scaling"]
    qh = query_heads(store.heads, info["num_heads"], info["num_kv_heads"])
    eager = load_model(dataclasses.replace(spec.model, attn_implementation="eager"))
    source = open_source(spec.data)
    tok = {m: store.tokens(m) for m in ("text", "image")}
    for sid in range(3):
        rec = source.get(sid)
        ref = eager_reference(eager, eager.adapter.build_batch(eager, [rec.image], [rec.text]), monkeypatch)
        for layer in store.layers:
            q = {m: store.vectors("q", layer, m, rope=True).compute()[tok[m]["sample_id"] == sid] for m in tok}
            k = {m: store.vectors("k", layer, m, rope=True).compute()[tok[m]["sample_id"] == sid] for m in tok}
            pos = {m: tok[m]["position"][tok[m]["sample_id"] == sid] for m in tok}
            for mq in tok:
                for mk in tok:
                    got_HSS = np.einsum("ahd,bhd->hab", q[mq], np.repeat(k[mk], G, axis=1)) * scale
                    want_HSS = ref.logits_LBHTT[layer][0][qh][:, pos[mq]][:, :, pos[mk]]
                    np.testing.assert_allclose(got_HSS, want_HSS, atol=2e-5, rtol=1e-4)
            pre = store.vectors("q", layer, "image").compute()[tok["image"]["sample_id"] == sid]
            assert np.abs(pre - q["image"]).max() > 1e-3  # RoPE really rotated the image queries


def test_a_damaged_value_chunk_is_found_and_redone_by_resume(tmp_path):
    """verify finds a flipped byte in a stored value chunk, --repair un-commits that shard, and the resumed
    extraction redoes exactly it: every q, k and v file then equals the undisturbed run's, byte for byte."""
    from kscale.store.verify import repair, verify_store

    spec, _ = _extract(tmp_path, "qwen2_5_vl")
    root = tmp_path / "store" / "shards"

    def files() -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("c.*")) if p.is_file()}

    before, marker0 = files(), (root / "s000000.done.json").read_bytes()
    assert any("/values/" in f for f in before) and any("/queries/" in f for f in before)
    bad = root / "s000001" / "values" / "text" / "values" / "c.0.0.0.0"
    b = bytearray(bad.read_bytes())
    b[-20] ^= 0xFF  # in the last layer's inner chunk
    bad.write_bytes(bytes(b))
    damage = verify_store(tmp_path / "store")
    assert [(d.shard, d.array) for d in damage] == [("s000001", "values/text/values")]
    assert repair(tmp_path / "store", damage) == ["s000001"]
    run_job(spec, show_bar=False)  # if_exists: resume
    assert verify_store(tmp_path / "store") == []
    assert files() == before
    assert (root / "s000000.done.json").read_bytes() == marker0  # the sound shard was not redone
