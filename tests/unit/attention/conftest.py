"""Fixtures for attention tests: the debug models with *sharpened* attention, loaded twice (SDPA for
kscale's path, eager for the reference), and an independent reference computed from the eager model.

The tiny random models attend almost uniformly (logits ~0.02), which would let wrong RoPE or masking
pass a 1e-5 check; scaling every q_proj/k_proj by ``SHARPEN`` (same weights in both copies) makes the
attention peaked, so the statistics are sensitive to every detail.

Legend: B batch, T tokens (keys), S query tokens, H query heads, L layers, M modalities.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kscale.models import IMAGE, MODALITY_CODES, PAD, TEXT, LoadedModel, load_model
from kscale.spec import GeneratedDataSpec, ModelSpec

SHARPEN = 100.0
STAT_NAMES = ["n_queries", "entropy"] + [f"{s}_{m}" for m in MODALITY_CODES
                                         for s in ("mass", "share", "efficiency", "logit_mean", "logit_sd")]


def _sharpened(path: str, attn_implementation: str) -> LoadedModel:
    lm = load_model(ModelSpec(path=path, device="cpu", dtype="float32", attn_implementation=attn_implementation))
    with torch.no_grad():
        for layer in lm.adapter.decoder_layers(lm.model):
            attn = layer.self_attn
            if hasattr(attn, "k_norm"):  # a QK-norm (Qwen3-VL) undoes any scale of q_proj/k_proj: scale its
                for norm in (attn.q_norm, attn.k_norm):  # weight, less (unit-RMS heads make logits large)
                    norm.weight.mul_(SHARPEN ** 0.25)
                continue
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.mul_(SHARPEN ** 0.5)
                if proj.bias is not None:
                    proj.bias.mul_(SHARPEN ** 0.5)
    return lm


@pytest.fixture(scope="session", params=["qwen2_5_vl", "llava", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def family_models(request) -> tuple[LoadedModel, LoadedModel]:
    """(sdpa model, eager model) of one family, same sharpened weights."""
    from kscale.models.debug import debug_model_dir

    path = debug_model_dir(request.param)
    return _sharpened(path, "sdpa"), _sharpened(path, "eager")


@pytest.fixture(scope="session")
def records():
    from kscale.data.generated import GeneratedSource

    src = GeneratedSource(GeneratedDataSpec(n_samples=6, image_size=112, tasks=["conflict", "position", "color"]))
    return [src.get(i) for i in range(6)]


@dataclass
class EagerReference:
    probs_LBHTT: list[np.ndarray]  # the model's own attention probabilities (output_attentions, eager)
    logits_LBHTT: list[np.ndarray]  # q·k·scaling from the post-RoPE q, k the model's attention received
    queries_LBHTD: list[np.ndarray]  # the post-RoPE queries the model's attention received


def eager_reference(eager: LoadedModel, batch, monkeypatch) -> EagerReference:
    """Run the eager model with output_attentions, recording the pre-softmax logits its attention computes."""
    attn_mods = [layer.self_attn for layer in eager.adapter.decoder_layers(eager.model)]
    family_mod = sys.modules[type(attn_mods[0]).__module__]
    original = family_mod.eager_attention_forward
    logits: dict[int, np.ndarray] = {}
    queries: dict[int, np.ndarray] = {}

    def recording(module, query, key, value, attention_mask, scaling, **kw):
        if any(module is m for m in attn_mods):
            k = family_mod.repeat_kv(key, module.num_key_value_groups)
            logits[module.layer_idx] = (torch.matmul(query, k.transpose(2, 3)) * scaling).double().numpy()
            queries[module.layer_idx] = query.numpy().copy()
        return original(module, query, key, value, attention_mask, scaling=scaling, **kw)  # Gemma 3: dropout is 6th

    monkeypatch.setattr(family_mod, "eager_attention_forward", recording)
    with torch.no_grad():
        out = eager.model(**batch.inputs, output_attentions=True, use_cache=False)
    monkeypatch.setattr(family_mod, "eager_attention_forward", original)
    L = len(attn_mods)
    assert len(out.attentions) == L and sorted(logits) == list(range(L))
    return EagerReference([a.double().numpy() for a in out.attentions], [logits[i] for i in range(L)],
                          [queries[i] for i in range(L)])


def reference_queries(batch, queries: str, last_k: int) -> list[np.ndarray]:
    """Per sample, the positions of the selected query tokens, written out directly from the definitions."""
    out = []
    for b in range(batch.modality_BT.shape[0]):
        mod = batch.modality_BT[b].numpy()
        n = int((mod != PAD).sum())
        if queries == "after_image":
            img = np.flatnonzero(mod == IMAGE)
            pos = [t for t in range(n) if len(img) and t > img[0] and mod[t] == TEXT]
        elif queries == "last_k":
            pos = list(range(max(0, n - last_k), n))
        else:
            pos = list(np.flatnonzero(batch.answer_mask_BT[b].numpy()))
        out.append(np.asarray(pos, dtype=int))
    return out


def reference_stats(ref: EagerReference, batch, queries_B: list[np.ndarray], layer: int, b: int,
                    q_head: int) -> dict[str, float]:
    """The statistics of one (sample, layer, query head), in float64, straight from the definitions."""
    p_ST = ref.probs_LBHTT[layer][b, q_head]
    x_ST = ref.logits_LBHTT[layer][b, q_head]
    mod = batch.modality_BT[b].numpy()
    real = batch.inputs["attention_mask"][b].numpy().astype(bool)
    qs = queries_B[b]
    out: dict[str, float] = {"n_queries": len(qs)}
    ent, mass, share, pairs = [], {m: [] for m in MODALITY_CODES}, {m: [] for m in MODALITY_CODES}, \
        {m: [] for m in MODALITY_CODES}
    for t in qs:
        vis = (np.arange(len(mod)) <= t) & real
        assert abs(p_ST[t][vis].sum() - 1) < 1e-5 and p_ST[t][~vis].max(initial=0) < 1e-6  # eager's mask agrees
        p = p_ST[t][vis]
        ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        for m, code in MODALITY_CODES.items():
            sel = vis & (mod == code)
            mass[m].append(p_ST[t][sel].sum())
            share[m].append(sel.sum() / vis.sum())
            pairs[m].append(x_ST[t][sel])
    nan = float("nan")
    out["entropy"] = float(np.mean(ent)) if len(qs) else nan
    for m in MODALITY_CODES:
        mm = float(np.mean(mass[m])) if len(qs) else nan
        sh = float(np.mean(share[m])) if len(qs) else nan
        xs = np.concatenate(pairs[m]) if pairs[m] else np.zeros(0)
        out.update({f"mass_{m}": mm, f"share_{m}": sh, f"efficiency_{m}": mm / sh if sh > 0 else nan,
                    f"logit_mean_{m}": float(xs.mean()) if len(xs) else nan,
                    f"logit_sd_{m}": float(xs.std()) if len(xs) else nan})
    return out
