"""Architecture facts that need no torch: modality tags, the supported families, the MaLoRA target
mapping, the head-dim formula and layer resolution.

They live apart from ``registry.py`` (which imports torch and transformers) so that the spec loader, the
store layout and the CLI can ask them without loading torch. ``kscale.models`` and
``kscale.models.registry`` re-export every name; each family's ``Adapter`` answers the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

# Modality tags stored per token. PAD is never stored. The store's groups follow MODALITIES' order.
TEXT, IMAGE, VIDEO, SPECIAL, PAD = 0, 1, 2, 3, -1
MODALITY_CODES = {"text": TEXT, "image": IMAGE, "video": VIDEO, "special": SPECIAL}
MODALITY_NAMES = {v: k for k, v in MODALITY_CODES.items()}
MODALITIES = tuple(MODALITY_CODES)

# Families with an Adapter (``kscale.models.<family>``); tests check that each one is registered.
FAMILIES = ("qwen2_5_vl", "llava", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "llava_next", "llava_onevision",
            "idefics3", "paligemma", "internvl", "gemma3", "llama4")

# MaLoRA targets per family: projection name -> the decoder-layer sub-module that holds it (PEFT keeps
# the same knowledge in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING). The dense families share the
# Llama-style layout (Idefics3's text_model and the q/k norms of Gemma 3 and Qwen3-VL included: the
# projections keep their names).
_LLAMA_STYLE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Qwen3-VL-MoE's and Llama 4's experts are fused parameters (``experts.gate_up_proj``/``down_proj``, no
# nn.Linear; Llama 4's dense MLPs sit under ``feed_forward``): only their attention projections are targets.
_ATTENTION_ONLY = {k: v for k, v in _LLAMA_STYLE.items() if v == "self_attn"}
_MOE = ("qwen3_vl_moe", "llama4")
MALORA_TARGETS: dict[str, dict[str, str]] = {
    **{f: _LLAMA_STYLE for f in FAMILIES if f not in _MOE}, **{f: _ATTENTION_ONLY for f in _MOE}}
MALORA_TARGET_NAMES = tuple(_LLAMA_STYLE)  # every projection some family can adapt


def head_dim(text_config: Mapping[str, Any]) -> int:
    """Head dim of a language model from its (text) config dict: ``head_dim``, else hidden / heads."""
    return text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]


def attention_scaling(text_config: Mapping[str, Any]) -> dict[str, float]:
    """How the language model scales its attention logits, from its (text) config dict: ``attention_scaling``
    multiplies q·k (``query_pre_attn_scalar ** -0.5`` where the config sets one, as Gemma 2/3 do, else
    ``head_dim ** -0.5``), and ``attn_logit_softcapping`` (Gemma 2) caps the scaled logits with
    ``c * tanh(x / c)`` before the softmax; absent when the config sets none."""
    scalar = text_config.get("query_pre_attn_scalar") or head_dim(text_config)
    out = {"attention_scaling": float(scalar) ** -0.5}
    if text_config.get("attn_logit_softcapping"):
        out["attn_logit_softcapping"] = float(text_config["attn_logit_softcapping"])
    return out


def layer_problems(layers: Literal["all"] | Sequence[int], n_layers: int,
                   field: str = "layers") -> list[tuple[str, str]]:
    """Problems of a layer selection against a model with ``n_layers`` layers, as (dotted field, message).

    Negative indices count from the end; an index outside [-n_layers, n_layers) is an error, and so is a
    layer named twice (``[1, -1]`` on a 2-layer model names layer 1 twice).
    """
    if layers == "all":
        return []
    out: list[tuple[str, str]] = []
    seen: dict[int, int] = {}
    for i, idx in enumerate(layers):
        if not -n_layers <= idx < n_layers:
            out.append((f"{field}[{i}]", f"layer {idx} out of range (model has {n_layers})"))
            continue
        layer = idx % n_layers
        if layer in seen:
            out.append((f"{field}[{i}]", f"layer {idx} repeats {field}[{seen[layer]}] (both are layer {layer})"))
        seen.setdefault(layer, i)
    return out


def resolve_layers(layers: Literal["all"] | Sequence[int], n_layers: int, field: str = "layers") -> list[int]:
    """Layer indices, ascending, for ``'all'`` or explicit indices (negative count from the end).

    Out-of-range or repeated layers raise ``ValueError`` naming ``field`` (see :func:`layer_problems`).
    """
    problems = layer_problems(layers, n_layers, field)
    if problems:
        raise ValueError("; ".join(f"{f}: {m}" for f, m in problems))
    return list(range(n_layers)) if layers == "all" else sorted(idx % n_layers for idx in layers)
