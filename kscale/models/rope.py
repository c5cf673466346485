"""Each family's rotary position embedding, rebuilt from the checkpoint's config alone (no weights).

The key store holds pre-RoPE keys (``k_proj`` outputs) and the RoPE positions the model used
(``rope_pos``: 3 rows for Qwen2.5-VL's M-RoPE, 1 row for Llama-style 1-D RoPE). Applying the family's own
rotary module to those positions rebuilds exactly the post-RoPE keys the model attends with (the keys in
its KV cache). The same functions serve the attention statistics (``kscale.attention.stats``), which
call them with the *loaded* model's rotary module, and the reader (``kscale.store.rope``), which
builds the module here from config.json, so both key spaces are available without storing keys twice.

Positions travel in kscale's layout ``pos_BTR`` (what ``kscale.extract.hooks.capture`` records);
``native_positions`` turns them back into what the rotary module takes: (3, B, T) for M-RoPE, (B, T)
for 1-D RoPE.

Two rotation layouts exist: most families rotate the pairs (i, i + D/2) (``rotate_half``); Llama 4 rotates
adjacent pairs (2i, 2i + 1) as complex numbers (its rotary module returns ``freqs_cis``, one complex tensor).
:func:`cos_sin` turns a complex module's output into cos/sin repeated per pair and :func:`is_interleaved`
tells :func:`rotate` which layout to use. A layer without RoPE (Llama 4's NoPE layers, ``no_rope_layers[i]
== 0``) gets :class:`NoRope` from :func:`rotary_for_layer`: cos 1, sin 0, so post-RoPE keys equal the stored
keys exactly.

Legend: B batch, T tokens, N store rows (tokens), H heads, D head dim, R rope rows.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch


def _rotary_class(model_type: str, prefixes: tuple[str, ...] = ()) -> type[torch.nn.Module]:
    """``<Prefix>RotaryEmbedding`` from ``transformers.models.<model_type>`` (e.g. llama -> LlamaRotaryEmbedding),
    the first of ``prefixes`` (then ``model_type``) that the module defines."""
    try:
        mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as e:
        raise ValueError(f"no transformers modeling module for model_type {model_type!r}") from e
    names = {name.replace("_", "").lower(): name for name in dir(mod)}
    wants = [p.replace("_", "").lower() + "rotaryembedding" for p in (*prefixes, model_type)]
    for want in wants:
        if want in names:
            return getattr(mod, names[want])
    raise ValueError(f"transformers.models.{model_type} has no rotary embedding class (looked for {wants})")


def rotary_from_config(config: Any) -> torch.nn.Module:
    """The language model's rotary module for a full model config (a Qwen-VL, or LLaVA + its text model).

    Only the config is read: the module holds ``inv_freq`` (computed from ``rope_parameters``) and
    ``attention_scaling``, no weights. A Qwen-VL text config gets its family's own class
    (``Qwen2_5_VLRotaryEmbedding``, ``Qwen3VLTextRotaryEmbedding``, ...), which knows its ``mrope_section``
    (and Qwen3-VL's interleaving); LLaVA's gets the rotary class of its text model (Llama for LLaVA-1.5).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:  # a text model of its own (LLaVA's Llama)
        cls = _rotary_class(text.model_type)
    except ValueError:  # a text config inside the family's module: Qwen3VLTextRotaryEmbedding, Qwen2VLRotaryEmbedding
        cls = _rotary_class(config.model_type, (text.model_type,))
    return cls(text).eval()


class _LayerTypeRotary(torch.nn.Module):
    """A rotary module with one RoPE per layer type (Gemma 3: local and global base frequencies), bound to
    one layer's type so it is called like any other: ``rotary(x, position_ids)``."""

    def __init__(self, rotary: torch.nn.Module, layer_type: str):
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary(x, position_ids, self.layer_type)


class NoRope(torch.nn.Module):
    """The "rotary module" of a layer without RoPE (Llama 4's NoPE layers): cos 1 and sin 0 everywhere."""

    layer_type = "no_rope"  # layer_cos_sin caches per layer type

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        shape = (*position_ids.shape, self.head_dim)
        return (torch.ones(shape, dtype=torch.float32, device=position_ids.device),
                torch.zeros(shape, dtype=torch.float32, device=position_ids.device))


def rotary_for_layer(rotary: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The rotary module that layer ``layer`` uses: ``rotary`` itself, :class:`NoRope` where the config's
    ``no_rope_layers`` marks the layer 0 (Llama 4), or for a model whose RoPE depends on the layer type (its
    rotary module keeps ``config.layer_types`` and takes a layer type) that type's."""
    config = getattr(rotary, "config", None)
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope is not None and not no_rope[layer]:
        return NoRope(config.head_dim)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or not hasattr(rotary, "layer_types"):
        return rotary
    return _LayerTypeRotary(rotary, layer_types[layer])


def load_rotary(model_path: str) -> torch.nn.Module:
    """``rotary_from_config`` for a checkpoint directory (config.json only)."""
    from transformers import AutoConfig

    return rotary_from_config(AutoConfig.from_pretrained(model_path))


def layer_cos_sin(rotary: torch.nn.Module, layer: int, pos_BTR: torch.Tensor,
                  cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cos_sin` of layer ``layer``'s RoPE (:func:`rotary_for_layer`), computed once per layer type
    for the positions ``pos_BTR`` (``cache``: a dict the caller keeps for those positions)."""
    layer_rotary = rotary_for_layer(rotary, layer)
    kind = getattr(layer_rotary, "layer_type", None)
    if kind not in cache:
        cache[kind] = cos_sin(layer_rotary, pos_BTR)
    return cache[kind]


def native_positions(pos_BTR: torch.Tensor) -> torch.Tensor:
    """kscale's (B, T, R) positions in the rotary module's layout: (R, B, T) if R == 3, else (B, T)."""
    if pos_BTR.shape[-1] == 1:
        return pos_BTR[..., 0]
    return pos_BTR.permute(2, 0, 1)


def cos_sin(rotary: torch.nn.Module, pos_BTR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_BTD, sin_BTD) in float32 from the rotary module, attention_scaling included (as the model does).
    A module that returns complex ``freqs_cis`` (B, T, D/2) gives its real and imaginary parts, each repeated
    per adjacent pair (D): the layout :func:`rotate` takes with ``interleaved=True``."""
    probe = torch.empty(0, dtype=torch.float32, device=pos_BTR.device)  # the module reads only device/dtype
    with torch.no_grad():
        out = rotary(probe, native_positions(pos_BTR).long())
    if torch.is_tensor(out) and out.is_complex():
        return out.real.float().repeat_interleave(2, -1), out.imag.float().repeat_interleave(2, -1)
    cos, sin = out
    return cos.float(), sin.float()


def is_interleaved(rotary: torch.nn.Module) -> bool:
    """Whether ``rotary`` rotates adjacent pairs (its output is complex ``freqs_cis``: Llama 4)."""
    if isinstance(rotary, NoRope):
        return False
    layer_types = getattr(getattr(rotary, "config", None), "layer_types", None)
    if layer_types is not None and hasattr(rotary, "layer_types"):  # one RoPE per layer type: probe one
        rotary = _LayerTypeRotary(rotary, layer_types[0])
    device = _device(rotary)
    with torch.no_grad():
        out = rotary(torch.empty(0, device=device), torch.zeros((1, 1), dtype=torch.long, device=device))
    return torch.is_tensor(out) and out.is_complex()


def _device(module: torch.nn.Module) -> torch.device:
    buf = next(iter(module.buffers()), None)
    return buf.device if buf is not None else torch.device("cpu")


def rotate(x_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor,
           interleaved: bool = False) -> torch.Tensor:
    """``x*cos + rotate_half(x)*sin`` with heads on dim 2 (transformers' apply_rotary_pos_emb, unsqueeze_dim=2);
    ``interleaved``: pairs (2i, 2i+1) as complex numbers (Llama 4's apply_rotary_emb), cos/sin from
    :func:`cos_sin` of its complex module."""
    if interleaved:
        rot = torch.stack((-x_BTHD[..., 1::2], x_BTHD[..., 0::2]), dim=-1).flatten(-2)
    else:
        half = x_BTHD.shape[-1] // 2
        rot = torch.cat((-x_BTHD[..., half:], x_BTHD[..., :half]), dim=-1)
    return x_BTHD * cos_BTD[:, :, None] + rot * sin_BTD[:, :, None]


def apply_rope(keys_NHD: np.ndarray | torch.Tensor, rope_pos_NR: np.ndarray | torch.Tensor,
               rotary: torch.nn.Module) -> np.ndarray:
    """Post-RoPE float32 keys for store rows: any block of rows works (rows are independent), so it maps
    over dask blocks. Returns numpy, like the blocks it is given."""
    k = torch.as_tensor(np.asarray(keys_NHD, dtype=np.float32))
    pos = torch.as_tensor(np.asarray(rope_pos_NR, dtype=np.int64))
    if k.shape[0] == 0 or isinstance(rotary, NoRope):  # a NoPE layer: post-RoPE keys are the stored keys
        return k.numpy()
    cos, sin = cos_sin(rotary, pos[None])  # one "batch" of N tokens
    return rotate(k[None], cos, sin, is_interleaved(rotary))[0].numpy()
