"""Post-RoPE keys from a store of pre-RoPE keys: the space the model really attends in, rebuilt lazily.

The store keeps one copy of the keys, pre-RoPE (``k_proj`` outputs), with each token's RoPE positions
(``rope_pos``: 3 rows for M-RoPE, 1 for 1-D RoPE). ``rope_keys(store, layer, modality)`` maps the family's
rotary embedding (``kscale.models.rope``, rebuilt from the checkpoint's config.json, checked against the
config hash recorded at extraction) over the lazy key blocks, so analysis can choose either key space
without keys being stored twice. The result equals the keys in the model's KV cache for the same inputs.
The reader's ``KeyStore.keys(..., rope=True)`` and stored queries (:mod:`kscale.store.queries`) go through
:func:`rope_lazy` too, importing this module (and torch) only when asked.

Legend: N tokens (store rows), H kv heads, D head dim, R rope rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import dask.array as da
import numpy as np
import torch

from kscale.models.rope import apply_rope, rotary_for_layer, rotary_from_config
from kscale.store.reader import KeyStore, StoreError


def _config_dir(model_attrs: dict) -> Path:
    """The checkpoint directory whose config.json is the one recorded in the store (hash checked)."""
    from kscale.models.registry import resolve_model_path

    tried = []
    for cand in (model_attrs.get("resolved_path"), model_attrs.get("path")):
        if not cand:
            continue
        d = Path(resolve_model_path(cand))
        cfg = d / "config.json"
        tried.append(str(d))
        if cfg.is_file():
            digest = hashlib.sha256(cfg.read_text().encode()).hexdigest()[:16]
            if digest == model_attrs.get("config_hash"):
                return d
            tried[-1] += f" (config hash {digest} != stored {model_attrs.get('config_hash')})"
    raise StoreError("post-RoPE keys need the model's config.json as recorded at extraction; none found at "
                     + ", ".join(tried or ["<no model path in store attributes>"]))


def store_rotary(store: KeyStore) -> torch.nn.Module:
    """The rotary embedding module of the model that wrote ``store`` (from its config, no weights).

    Stores record the checkpoint's config.json in their attributes, so they stay readable after the
    checkpoint moves; older stores fall back to the recorded checkpoint directory (hash-checked).
    """
    from transformers import AutoConfig

    recorded = store.attrs["model"].get("config")
    if recorded:
        return rotary_from_config(AutoConfig.for_model(**recorded))
    cfg = AutoConfig.from_pretrained(str(_config_dir(store.attrs["model"])))
    return rotary_from_config(cfg)


def _rope_block(keys_NHD: np.ndarray, rope_pos_NR: np.ndarray, rotary: torch.nn.Module) -> np.ndarray:
    return apply_rope(keys_NHD, rope_pos_NR, rotary)


def rope_lazy(keys_NHD: da.Array, rope_pos_NR: np.ndarray | da.Array, rotary: torch.nn.Module) -> da.Array:
    """Blockwise RoPE over a lazy (N, H, D) key array; ``rope_pos_NR`` rows align with its rows (a lazy
    ``token_column(modality, "rope_pos")`` streams with the keys: nothing is loaded in the driver)."""
    if keys_NHD.shape[0] != rope_pos_NR.shape[0]:
        raise StoreError(f"{keys_NHD.shape[0]} key rows but {rope_pos_NR.shape[0]} rope_pos rows")
    chunks = (keys_NHD.chunks[0], rope_pos_NR.shape[1])
    pos = (rope_pos_NR.rechunk(chunks) if isinstance(rope_pos_NR, da.Array)
           else da.from_array(np.asarray(rope_pos_NR), chunks=chunks))
    return da.blockwise(_rope_block, "nhd", keys_NHD, "nhd", pos, "nr", concatenate=True, dtype=np.float32,
                        rotary=rotary)


def rope_keys(store: KeyStore, layer: int, modality: str, heads: list[int] | None = None,
              rotary: torch.nn.Module | None = None) -> da.Array:
    """(N, H, D) float32 post-RoPE keys of one layer and modality, rows aligned with ``store.tokens``.

    This is what ``KeyStore.keys(layer, modality, heads, rope=True)`` returns; pass ``rotary`` to reuse one
    module across calls (``store_rotary(store)``).
    """
    keys_NHD = store.keys(layer, modality, heads)
    rope_pos_NR = store.token_column(modality, "rope_pos")
    rotary = rotary if rotary is not None else store_rotary(store)
    return rope_lazy(keys_NHD, rope_pos_NR, rotary_for_layer(rotary, layer))
