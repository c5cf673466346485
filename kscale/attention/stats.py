"""Per-sample attention statistics from hooked q/k projections, computed beside the fast forward pass.

How it connects: extraction runs the model with its own kernel (SDPA/flash) under
``kscale.extract.hooks.capture``, which records every hooked layer's ``q_proj``/``k_proj`` outputs and the
RoPE positions the model passed to its rotary embedding. ``batch_stats`` rebuilds what the kernel saw —
post-RoPE queries and keys from the model's *own* rotary module (``kscale.models.rope``), the attention
module's ``scaling``, the causal + padding mask, grouped-query heads mapped to their KV head — and reduces
``softmax(q·k·scaling)`` over chunks of selected queries into running sums. Only one (B, H, C, T) block of
logits exists at a time, so memory is O(T·chunk) however long the image (short sequences stack several
layers into one block of at most ``BLOCK_ELEMENTS``, to cut per-operation overhead).

One output row per (sample, layer, query head) of the kept KV heads (``extract.heads``): ``sample_id``,
``layer``, ``q_head``, ``kv_head``, ``n_queries``, ``entropy`` (mean over queries of the attention entropy,
nats), and five (n, M) columns whose column index is the key modality's code (``table["mass"][:, IMAGE]``;
``flat_columns`` turns them into ``mass_image``, ...):

- ``mass``: mean over selected queries of the attention probability on keys of each modality;
- ``share``: mean over queries of the fraction of visible keys that are of each modality;
- ``efficiency`` = mass / share (1: attention proportional to presence; < 1: under-used);
- ``logit_mean``, ``logit_sd``: mean and population SD of ``q·k·scaling`` over all
  (selected query, visible key of the modality) pairs.

(Few wide columns rather than 26 narrow ones: every column is one Zarr array per shard.)

Legend: B batch rows (samples, or layer x sample where layers are stacked), N stacked rows, T tokens,
Q selected queries per sample (padded), C queries in a chunk, K kept kv heads, G query heads per kv head,
H = K·G query heads, D head dim, M key modalities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kscale.models import IMAGE, MODALITY_CODES, PAD, TEXT, Batch, LoadedModel
from kscale.models.rope import is_interleaved, layer_cos_sin, rotate

if TYPE_CHECKING:
    from kscale.spec import AttentionSpec

MODALITY_ORDER = tuple(MODALITY_CODES)  # text, image, video, special: the M axis, index == modality code
assert [MODALITY_CODES[m] for m in MODALITY_ORDER] == list(range(len(MODALITY_ORDER)))
BY_MODALITY = ("mass", "share", "efficiency", "logit_mean", "logit_sd")  # (n, M) columns
BLOCK_ELEMENTS = 1 << 22  # logits elements per pass when stacking layers (16 MiB in float32)


@dataclass
class _Sums:
    """Running sums over query chunks for one layer (float64)."""

    n_queries_B: torch.Tensor
    share_BM: torch.Tensor
    mass_BHM: torch.Tensor
    entropy_BH: torch.Tensor
    n_pairs_BM: torch.Tensor
    logit_s1_BHM: torch.Tensor  # sum of logits
    logit_s2_BHM: torch.Tensor  # sum of squared logits (from per-row shifted moments)


def select_queries(batch, queries: str, last_k: int) -> torch.Tensor:
    """query_BT: which tokens' attention rows are measured (``AttentionSpec.queries``)."""
    mod_BT = batch.modality_BT
    real_BT = mod_BT != PAD
    if queries == "answer":
        return batch.answer_mask_BT & real_BT
    if queries == "last_k":
        pos_BT = torch.arange(mod_BT.shape[1])[None]
        length_B1 = real_BT.sum(1, keepdim=True)
        return real_BT & (pos_BT >= length_B1 - last_k)
    # after_image: text tokens after the first image token (none in samples without an image)
    seen_image_BT = torch.cumsum((mod_BT == IMAGE).int(), dim=1) > 0
    return seen_image_BT & (mod_BT == TEXT)


def gather_queries(query_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_BQ, valid_BQ): each sample's query positions, left-aligned and padded with position 0."""
    n_B = query_BT.sum(1)
    Q = int(n_B.max()) if len(n_B) else 0
    order_BT = torch.argsort((~query_BT).int(), dim=1, stable=True)  # query positions first, in order
    idx_BQ = order_BT[:, :Q]
    valid_BQ = torch.arange(Q)[None] < n_B[:, None]
    return torch.where(valid_BQ, idx_BQ, 0), valid_BQ


def modality_onehot(modality_BT: torch.Tensor) -> torch.Tensor:
    """onehot_BTM float32 over MODALITY_ORDER (all zero for padding)."""
    codes = torch.tensor([MODALITY_CODES[m] for m in MODALITY_ORDER], dtype=modality_BT.dtype)
    return (modality_BT[..., None] == codes).float()


def _chunk(q_BKGCD: torch.Tensor, idx_BC: torch.Tensor, valid_BC: torch.Tensor, k_BKTD: torch.Tensor,
           key_valid_BT: torch.Tensor, onehot_BTM: torch.Tensor, scaling_B: torch.Tensor, sums: _Sums) -> None:
    """Add one chunk of queries to ``sums``: the only place a (B, H, C, T) tensor exists."""
    B, K, G, C, D = q_BKGCD.shape
    T = k_BKTD.shape[2]
    logits_BHCT = torch.matmul(q_BKGCD.reshape(B, K, G * C, D), k_BKTD.transpose(2, 3)).view(B, K * G, C, T)
    logits_BHCT.mul_(scaling_B[:, None, None, None])
    key_pos_T = torch.arange(T, device=idx_BC.device)
    visible_BCT = (key_pos_T[None, None] <= idx_BC[..., None]) & key_valid_BT[:, None]
    visible_BCT &= valid_BC[..., None]
    visible_BCT[..., 0] |= ~valid_BC  # padded query rows see key 0 (finite softmax), then get weight 0
    w_BC = valid_BC.double()

    rowmax_BHC1 = logits_BHCT.masked_fill(~visible_BCT[:, None], float("-inf")).amax(-1, keepdim=True)
    shifted_BHCT = (logits_BHCT - rowmax_BHC1).masked_fill_(~visible_BCT[:, None], 0.0)
    exp_BHCT = shifted_BHCT.exp().mul_(visible_BCT[:, None])
    z_BHC = exp_BHCT.sum(-1)
    p_BHCT = exp_BHCT.div_(z_BHC[..., None])
    # entropy = log z - sum p * (x - max); masked entries have p = 0
    entropy_BHC = z_BHC.log() - (p_BHCT * shifted_BHCT).sum(-1)
    mass_BHCM = torch.matmul(p_BHCT, onehot_BTM[:, None])
    n_BCM = torch.matmul(visible_BCT.float(), onehot_BTM).double()
    # moments per row in the shifted frame (no cancellation against the row's offset), combined in float64
    s1_BHCM = torch.matmul(shifted_BHCT, onehot_BTM[:, None]).double()
    s2_BHCM = torch.matmul(shifted_BHCT * shifted_BHCT, onehot_BTM[:, None]).double()
    n_B1CM = n_BCM[:, None]
    mu_BHCM = s1_BHCM / n_B1CM.clamp(min=1)
    m2_BHCM = (s2_BHCM - s1_BHCM * mu_BHCM).clamp(min=0)
    mean_BHCM = mu_BHCM + rowmax_BHC1.double()
    wq_B1C1 = w_BC[:, None, :, None]

    sums.n_queries_B += w_BC.sum(1)
    sums.share_BM += ((n_BCM / n_BCM.sum(-1, keepdim=True)) * w_BC[..., None]).sum(1)
    sums.mass_BHM += (mass_BHCM.double() * wq_B1C1).sum(2)
    sums.entropy_BH += (entropy_BHC.double() * w_BC[:, None]).sum(2)
    sums.n_pairs_BM += (n_BCM * w_BC[..., None]).sum(1)
    sums.logit_s1_BHM += (n_B1CM * mean_BHCM * wq_B1C1).sum(2)
    sums.logit_s2_BHM += ((m2_BHCM + n_B1CM * mean_BHCM * mean_BHCM) * wq_B1C1).sum(2)


def layer_sums(q_BTKGD: torch.Tensor, k_BTKD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor,
               idx_BQ: torch.Tensor, valid_BQ: torch.Tensor, key_valid_BT: torch.Tensor,
               onehot_BTM: torch.Tensor, scaling_B: torch.Tensor, query_chunk: int, interleaved: bool = False) -> _Sums:
    """Statistics sums of B rows: RoPE on the selected queries and all keys (``interleaved``: adjacent pairs,
    Llama 4), then chunk over queries."""
    B, T, K, G, D = q_BTKGD.shape
    M = onehot_BTM.shape[-1]
    H = K * G
    dev = q_BTKGD.device
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
    sums = _Sums(z(B), z(B, M), z(B, H, M), z(B, H), z(B, M), z(B, H, M), z(B, H, M))
    k_BKTD = rotate(k_BTKD.float(), cos_BTD, sin_BTD, interleaved).transpose(1, 2)
    gather = lambda x, idx: torch.gather(x, 1, idx.view(*idx.shape, *[1] * (x.ndim - 2)).expand(  # noqa: E731
        *idx.shape, *x.shape[2:]))
    for a in range(0, idx_BQ.shape[1], query_chunk):
        idx_BC, valid_BC = idx_BQ[:, a:a + query_chunk], valid_BQ[:, a:a + query_chunk]
        C = idx_BC.shape[1]
        q_BCHD = rotate(gather(q_BTKGD, idx_BC).float().view(B, C, H, D), gather(cos_BTD, idx_BC),
                        gather(sin_BTD, idx_BC), interleaved)
        q_BKGCD = q_BCHD.view(B, C, K, G, D).permute(0, 2, 3, 1, 4)
        _chunk(q_BKGCD, idx_BC, valid_BC, k_BKTD, key_valid_BT, onehot_BTM, scaling_B, sums)
    return sums


def finish(sums: _Sums) -> dict[str, np.ndarray]:
    """Per (sample, query head) statistics: (B, H) or, by key modality, (B, H, M) float64; NaN where
    undefined (no queries, or no visible key of that modality)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        nq_B = sums.n_queries_B.cpu().numpy()
        mass_BHM = sums.mass_BHM.cpu().numpy() / nq_B[:, None, None]
        share_BHM = np.broadcast_to((sums.share_BM.cpu().numpy() / nq_B[:, None])[:, None], mass_BHM.shape)
        npairs_B1M = sums.n_pairs_BM.cpu().numpy()[:, None]
        mean_BHM = sums.logit_s1_BHM.cpu().numpy() / npairs_B1M
        var_BHM = np.maximum(sums.logit_s2_BHM.cpu().numpy() / npairs_B1M - mean_BHM ** 2, 0.0)
        return {"n_queries": np.repeat(nq_B[:, None], mass_BHM.shape[1], 1).astype(np.int32),
                "entropy": sums.entropy_BH.cpu().numpy() / nq_B[:, None],
                "mass": mass_BHM, "share": share_BHM,
                "efficiency": np.where(share_BHM > 0, mass_BHM / share_BHM, np.nan),
                "logit_mean": mean_BHM, "logit_sd": np.sqrt(var_BHM)}


def flat_columns(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The table with each (n, M) column split into 1-D ``<stat>_<modality>`` columns (mass_image, ...)."""
    out = {}
    for name, col in table.items():
        if col.ndim == 2 and name in BY_MODALITY:
            out.update({f"{name}_{m}": col[:, code] for m, code in MODALITY_CODES.items()})
        else:
            out[name] = col
    return out


def layer_groups(layers: list[int], elements_per_layer: int, budget: int = BLOCK_ELEMENTS) -> list[list[int]]:
    """Consecutive groups of layers whose (layers·B, H, C, T) logits block stays within ``budget``
    elements (one layer per group when a single layer's block is already larger)."""
    per = max(1, budget // max(1, elements_per_layer))
    return [layers[a:a + per] for a in range(0, len(layers), per)]


def batch_stats(lm: LoadedModel, layers: list[int], kv_heads: list[int], batch: Batch, cap: Any,
                attn: AttentionSpec, sample_ids: list[int]) -> dict[str, np.ndarray]:
    """The attention table rows of one batch: one per (sample, layer, query head).

    ``lm`` is the model the batch ran through (its adapter finds the attention modules and the rotary
    embedding; its ``info`` gives the head counts), ``layers`` the hooked model layers, ``kv_heads`` the
    kept KV heads, ``cap`` the ``kscale.extract.hooks.Capture`` holding ``("q", i)`` and ``("k", i)`` for
    every layer in ``layers`` and ``positions_BTR``, ``attn`` the AttentionSpec. The extraction worker and
    the MaLoRA evaluation (``kscale.train.evaluate``) both call it. Rows come out sample-major, then layer,
    then query head. Short sequences stack several layers into one pass (rows layer-major), which divides
    the number of small tensor operations; long ones go one layer at a time.
    """
    info = lm.info
    G = info.num_heads // info.num_kv_heads
    heads = list(kv_heads)
    B, T = batch.inputs["attention_mask"].shape
    dev = cap.outputs[("k", layers[0])].device
    attn_modules = [layer.self_attn for layer in lm.adapter.decoder_layers(lm.model)]
    with torch.inference_mode():
        rotary, pos_BTR = lm.adapter.rotary_module(lm.model), cap.positions_BTR.to(dev)
        rope: dict = {}  # layer type (None: one RoPE for all layers) -> (cos_BTD, sin_BTD)
        pairs = is_interleaved(rotary)  # Llama 4 rotates adjacent pairs
        idx_BQ, valid_BQ = gather_queries(select_queries(batch, attn.queries, attn.last_k))
        key_valid_BT = batch.inputs["attention_mask"].bool()
        onehot_BTM = modality_onehot(batch.modality_BT)
        shared = [t.to(dev) for t in (idx_BQ, valid_BQ, key_valid_BT, onehot_BTM)]
        chunk = max(1, attn.query_chunk)
        per_layer: dict[int, dict[str, np.ndarray]] = {}
        for group in layer_groups(layers, B * len(heads) * G * min(chunk, idx_BQ.shape[1]) * T):
            q_NTKGD = torch.cat([cap.outputs[("q", i)].view(B, T, info.num_kv_heads, G, info.head_dim)[:, :, heads]
                                 for i in group])
            k_NTKD = torch.cat([cap.outputs[("k", i)].view(B, T, info.num_kv_heads, info.head_dim)[:, :, heads]
                                for i in group])
            scaling_N = torch.tensor([float(attn_modules[i].scaling) for i in group for _ in range(B)], device=dev)
            rep = [t.repeat(len(group), *[1] * (t.ndim - 1)) for t in shared]
            cos_NTD = torch.cat([layer_cos_sin(rotary, i, pos_BTR, rope)[0] for i in group])  # each layer's RoPE
            sin_NTD = torch.cat([layer_cos_sin(rotary, i, pos_BTR, rope)[1] for i in group])
            stats = finish(layer_sums(q_NTKGD, k_NTKD, cos_NTD, sin_NTD, *rep, scaling_N, chunk, pairs))
            for j, i in enumerate(group):
                per_layer[i] = {k: v[j * B:(j + 1) * B] for k, v in stats.items()}
    return _rows([per_layer[i] for i in layers], layers, heads, G, sample_ids)


def _rows(per_layer: list[dict[str, np.ndarray]], layers: list[int], heads: list[int], G: int,
          sample_ids: list[int]) -> dict[str, np.ndarray]:
    """Flatten per-layer (B, H) statistics into table columns ordered (sample, layer, query head)."""
    B, L, H = len(sample_ids), len(layers), len(heads) * G
    q_head_H = np.array([k * G + g for k in heads for g in range(G)], dtype=np.int32)
    b_N, l_N, h_N = (a.ravel() for a in np.meshgrid(np.arange(B), np.arange(L), np.arange(H), indexing="ij"))
    out = {
        "sample_id": np.asarray(sample_ids, np.int64)[b_N],
        "layer": np.asarray(layers, np.int32)[l_N],
        "q_head": q_head_H[h_N],
        "kv_head": q_head_H[h_N] // G,
    }
    for name, first in per_layer[0].items():  # (B, H[, M]) per layer -> (B, L, H[, M]) -> rows
        out[name] = np.stack([d[name] for d in per_layer], axis=1).reshape(B * L * H, *first.shape[2:])
    return out
