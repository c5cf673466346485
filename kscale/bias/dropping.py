"""Token dropping (the data factor): which tokens to drop, and a forward that drops exactly those.

Dropping = masking the token as a key (``attention_mask`` 0), so no later token can read it, while every
kept token keeps the position it has in the full sequence. The positions must be computed from the
full sequence *before* masking and passed explicitly: Qwen2.5-VL's ``get_rope_index`` derives M-RoPE
positions from the attention mask, so a masked sequence would otherwise be re-numbered. With explicit
positions a dropped token is indistinguishable from one deleted from the sequence (tested against
deleting the rows of ``inputs_embeds``).

Image tokens are ranked by the attention they receive (:func:`attention_received`), rebuilt from hooked
q/k projections with the model's own rotary module, the same way as :mod:`kscale.attention.stats`
(``select_queries``/``gather_queries`` choose the query tokens). Orders:

- ``random``: a seeded random subset of the image tokens (seed, sample id);
- ``least_attended`` / ``most_attended``: image tokens by attention received, ascending / descending;
- ``text``: a seeded random subset of the text context tokens (text tokens of the prompt, not the answer),
  the same fraction, as the comparison: is the image more redundant than the language?

Legend: B batch, T tokens, R rope rows (3 for M-RoPE), Q selected queries, C queries per chunk,
H query heads, K kv heads, G = H / K, D head dim, L layers.
"""

from __future__ import annotations

import numpy as np
import torch

from kscale.attention.stats import gather_queries, select_queries
from kscale.extract.hooks import capture
from kscale.models import IMAGE, PAD, TEXT
from kscale.models.rope import is_interleaved, layer_cos_sin, rotate

QUERY_CHUNK = 128


def full_positions(loaded, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """RoPE position ids of the full (unmasked) sequences, from the family adapter
    (:meth:`kscale.models.registry.Adapter.position_ids`): (3, B, T) for Qwen2.5-VL, (B, T) otherwise."""
    return loaded.adapter.position_ids(loaded, inputs)


def context_text_BT(modality_BT: torch.Tensor, answer_mask_BT: torch.Tensor) -> torch.Tensor:
    """Text tokens of the prompt that may be dropped: not the answer, not the first token, and not a token
    whose logits predict an answer token (that query must stay what it is: the one reading the context)."""
    predicts_answer_BT = torch.nn.functional.pad(answer_mask_BT[:, 1:], (0, 1), value=False)
    ctx_BT = (modality_BT == TEXT) & ~answer_mask_BT & ~predicts_answer_BT
    ctx_BT[:, 0] = False
    return ctx_BT


def attention_received(loaded, batch, layers: list[int], queries: str, last_k: int) -> torch.Tensor:
    """received_BT: attention each key token receives from the selected queries, averaged over queries,
    query heads and ``layers`` (0 on padding). One extra forward with q/k hooks."""
    lm = loaded
    info = lm.info
    q_mods = lm.adapter.query_modules(lm.model)
    k_mods = lm.adapter.key_modules(lm.model)
    mods = {("q", i): q_mods[i] for i in layers} | {("k", i): k_mods[i] for i in layers}
    inputs = {k: v.to(lm.device) for k, v in batch.inputs.items()}
    with torch.inference_mode(), capture(mods, lm.adapter.rotary_module(lm.model)) as cap:
        lm.model(**inputs, use_cache=False, logits_to_keep=1)
    B, T = inputs["input_ids"].shape
    H, K, D = info.num_heads, info.num_kv_heads, info.head_dim
    with torch.inference_mode():
        rotary, pos_BTR = lm.adapter.rotary_module(lm.model), cap.positions_BTR.to(lm.device)
        rope: dict = {}  # layer type (None: one RoPE for all layers) -> (cos_BTD, sin_BTD)
        pairs = is_interleaved(rotary)  # Llama 4 rotates adjacent pairs
        idx_BQ, valid_BQ = gather_queries(select_queries(batch, queries, last_k))
        idx_BQ, valid_BQ = idx_BQ.to(lm.device), valid_BQ.to(lm.device)
        key_valid_BT = inputs["attention_mask"].bool()
        attn_modules = [layer.self_attn for layer in lm.adapter.decoder_layers(lm.model)]
        received_BT = torch.zeros(B, T, dtype=torch.float64, device=lm.device)
        for i in layers:
            cos_BTD, sin_BTD = layer_cos_sin(rotary, i, pos_BTR, rope)  # Gemma 3: local, global layers differ
            q_BTHD = rotate(cap.outputs[("q", i)].float().view(B, T, H, D), cos_BTD, sin_BTD, pairs)
            k_BHTD = rotate(cap.outputs[("k", i)].float().view(B, T, K, D), cos_BTD, sin_BTD, pairs)
            k_BHTD = k_BHTD.repeat_interleave(H // K, dim=2).transpose(1, 2)
            received_BT += _received_one_layer(q_BTHD, k_BHTD, idx_BQ, valid_BQ, key_valid_BT,
                                               float(attn_modules[i].scaling))
        n_B1 = (valid_BQ.sum(1, keepdim=True) * H * len(layers)).clamp(min=1)
    return (received_BT / n_B1).float().cpu()


def _received_one_layer(q_BTHD: torch.Tensor, k_BHTD: torch.Tensor, idx_BQ: torch.Tensor, valid_BQ: torch.Tensor,
                        key_valid_BT: torch.Tensor, scaling: float) -> torch.Tensor:
    """Sum over selected queries and heads of softmax attention probabilities, per key: (B, T) float64."""
    B, T, H, D = q_BTHD.shape
    out_BT = torch.zeros(B, T, dtype=torch.float64, device=q_BTHD.device)
    key_pos_T = torch.arange(T, device=q_BTHD.device)
    for a in range(0, idx_BQ.shape[1], QUERY_CHUNK):
        idx_BC, valid_BC = idx_BQ[:, a:a + QUERY_CHUNK], valid_BQ[:, a:a + QUERY_CHUNK]
        C = idx_BC.shape[1]
        q_BCHD = torch.gather(q_BTHD, 1, idx_BC[:, :, None, None].expand(B, C, H, D))
        logits_BHCT = torch.matmul(q_BCHD.transpose(1, 2), k_BHTD.transpose(2, 3)) * scaling
        visible_BCT = (key_pos_T[None, None] <= idx_BC[..., None]) & key_valid_BT[:, None]
        logits_BHCT = logits_BHCT.masked_fill(~visible_BCT[:, None], float("-inf"))
        p_BHCT = torch.softmax(logits_BHCT, dim=-1).nan_to_num(0.0) * valid_BC[:, None, :, None]
        out_BT += p_BHCT.sum((1, 2)).double()
    return out_BT


def drop_indices(candidates_N: np.ndarray, n_drop: int, order: str, seed: int, sample_id: int,
                 received_N: np.ndarray | None = None) -> np.ndarray:
    """Which of ``candidates_N`` (token positions) to drop, sorted. Ties in attention break by position."""
    if n_drop <= 0:
        return np.empty(0, dtype=np.int64)
    if order in ("random", "text"):
        rng = np.random.default_rng([seed, sample_id, 0 if order == "random" else 1])
        picked = candidates_N[rng.permutation(len(candidates_N))[:n_drop]]
    else:
        assert received_N is not None
        rank = np.lexsort((candidates_N, received_N if order == "least_attended" else -received_N))
        picked = candidates_N[rank[:n_drop]]
    return np.sort(picked)


def drop_plan(batch, order: str, fraction: float, seed: int, sample_ids: list[int],
              received_BT: torch.Tensor | None) -> torch.Tensor:
    """drop_BT: tokens dropped at ``fraction`` of the image tokens (or text context tokens for ``text``)."""
    mod_BT = batch.modality_BT
    pool_BT = context_text_BT(mod_BT, batch.answer_mask_BT) if order == "text" else (mod_BT == IMAGE)
    drop_BT = torch.zeros_like(pool_BT)
    for b, sid in enumerate(sample_ids):
        cand_N = torch.nonzero(pool_BT[b]).flatten().numpy()
        n_drop = int(round(fraction * len(cand_N)))
        rec_N = None if received_BT is None else received_BT[b, cand_N].numpy()
        idx = drop_indices(cand_N, n_drop, order, seed, sid, rec_N)
        drop_BT[b, torch.from_numpy(idx)] = True
    assert not (drop_BT & (mod_BT == PAD)).any() and not (drop_BT & batch.answer_mask_BT).any()
    return drop_BT


def dropped_inputs(loaded, inputs: dict[str, torch.Tensor], drop_BT: torch.Tensor,
                   position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs with ``drop_BT`` masked out as keys and positions of the full sequence."""
    out = dict(inputs)
    out["attention_mask"] = inputs["attention_mask"] * (~drop_BT.to(inputs["attention_mask"].device)).long()
    out["position_ids"] = position_ids
    return out
