"""The gap text queries see: expected attention logits of image vs text keys under the text-query distribution.

For each layer and KV head, the text queries of its query-head group (stored with
``extract.attention.store_queries``; :mod:`kscale.store.queries`) score keys of each modality ``m``:

- **pre-RoPE**: ``E_q[q·k]·scale`` over every (text query, key of m) pair of the store. The mean over pairs
  of a bilinear form factorises exactly: ``E[q·k] = E[q]·E[k]``, so sums of q and k per sample bucket are
  all that is streamed.
- **post-RoPE** (how the model scores): a query only ever meets keys of its own sample, at the two tokens'
  positions, so the mean runs over the (q, k) pairs *within* samples (pairs across samples have no
  relative position the model ever uses), pooled over samples with weight = pairs:
  ``sum_s sum_{q,k in s} q·k / sum_s n_q,s n_k,s``. Within a sample it factorises again
  (``sum_q·sum_k`` of the rotated vectors), so per-shard sums per sample suffice (a shard holds whole
  samples). All pairs are counted, not only the causally visible ones: the store keeps a token sample and
  the question is what the key distribution offers to the query distribution.
- ``scale`` is the model's own logit scale when the store records one, else ``1/sqrt(D)``
  (:func:`kscale.store.scaling.attention_scale`; column ``logit_scale`` and ``scale_source``).
- ``gap = E[image] - E[text]`` with a sample-clustered interval: samples hash into buckets
  (:class:`kscale.analysis.source.Buckets`), delete-one-bucket jackknife SE, t interval
  (:mod:`kscale.analysis.stats`).
- **span share**: the key mean difference ``delta = mean image key - mean text key`` (pre-RoPE) projected on
  the top principal directions of the text queries (uncentred second moment ``sum q q^T``) holding
  ``energy`` (99%) of their energy: ``|P delta|^2 / |delta|^2`` lies where text queries look, the rest is
  orthogonal to every direction they use. With D <= 8 or a rank-deficient moment the exact span is what
  the threshold keeps (zero eigenvalues hold no energy).

Every sum is per bucket and adds across shards (:class:`QGapSums.merge`), so the pass is out-of-core: one
shard in memory at a time. ``run.query_gap`` writes ``query_gap_<store>.csv`` beside the results and
``report.py`` turns it into the section "What text queries see".

Legend: K buckets, H KV heads, G queries per KV head, Hq = H*G query heads, D head dim, N rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import pandas as pd

from kscale.analysis.source import Buckets
from kscale.analysis.stats import jackknife, t_interval

KEY_MODS = ("image", "text")


@dataclass
class QGapSums:
    """Mergeable per-bucket sums of one layer (float64)."""

    nq_K: np.ndarray          # text query tokens
    q_KHqD: np.ndarray        # sum of pre-RoPE text queries
    qq_HqDD: np.ndarray       # sum of q q^T (pre-RoPE), for the span
    nk_MK: np.ndarray         # keys per modality
    k_MKHD: np.ndarray        # sum of pre-RoPE keys
    pair_MKHq: np.ndarray     # sum over samples of sum_{q,k in sample} q·k (post-RoPE)
    npair_MK: np.ndarray      # sum over samples of n_q n_k

    @classmethod
    def zeros(cls, K: int, H: int, G: int, D: int) -> QGapSums:
        M, Hq = len(KEY_MODS), H * G
        return cls(np.zeros(K), np.zeros((K, Hq, D)), np.zeros((Hq, D, D)), np.zeros((M, K)),
                   np.zeros((M, K, H, D)), np.zeros((M, K, Hq)), np.zeros((M, K)))

    def merge(self, other: QGapSums) -> QGapSums:
        for f in self.__dataclass_fields__:
            getattr(self, f).__iadd__(getattr(other, f))
        return self


def _per_sample(x_NF: np.ndarray, sid_N: np.ndarray, ids_S: np.ndarray) -> np.ndarray:
    """(S, F) sums of rows per sample id in ``ids_S`` (sorted)."""
    out = np.zeros((len(ids_S), x_NF.shape[1]))
    np.add.at(out, np.searchsorted(ids_S, sid_N), x_NF)
    return out


def shard_sums(q_pre: np.ndarray, q_post: np.ndarray, q_sid: np.ndarray, k_pre: dict, k_post: dict,
               k_sid: dict, buckets: Buckets, H: int, G: int) -> QGapSums:
    """Sums of one run of whole samples: text queries (N, Hq, D) pre/post-RoPE with their sample ids, keys
    (N, H, D) pre/post-RoPE and ids per modality of ``KEY_MODS``."""
    D = q_pre.shape[-1]
    s = QGapSums.zeros(buckets.n_buckets, H, G, D)
    q_pre, q_post = q_pre.astype(np.float64), q_post.astype(np.float64)
    ids = np.unique(np.concatenate([q_sid] + [k_sid[m] for m in KEY_MODS]).astype(np.int64))
    b_S = buckets.of(ids)
    nq_S = _per_sample(np.ones((len(q_sid), 1)), q_sid, ids)[:, 0]
    np.add.at(s.nq_K, b_S, nq_S)
    np.add.at(s.q_KHqD, b_S, _per_sample(q_pre.reshape(len(q_pre), -1), q_sid, ids).reshape(-1, H * G, D))
    s.qq_HqDD += np.einsum("nhd,nhe->hde", q_pre, q_pre)
    qpost_SHqD = _per_sample(q_post.reshape(len(q_post), -1), q_sid, ids).reshape(-1, H, G, D)
    for mi, m in enumerate(KEY_MODS):
        kp, kr = k_pre[m].astype(np.float64), k_post[m].astype(np.float64)
        nk_S = _per_sample(np.ones((len(kp), 1)), k_sid[m], ids)[:, 0]
        np.add.at(s.nk_MK[mi], b_S, nk_S)
        np.add.at(s.k_MKHD[mi], b_S, _per_sample(kp.reshape(len(kp), -1), k_sid[m], ids).reshape(-1, H, D))
        kpost_SHD = _per_sample(kr.reshape(len(kr), -1), k_sid[m], ids).reshape(-1, H, D)
        pair_SHq = np.einsum("shgd,shd->shg", qpost_SHqD, kpost_SHD).reshape(len(ids), H * G)
        np.add.at(s.pair_MKHq[mi], b_S, pair_SHq)
        np.add.at(s.npair_MK[mi], b_S, nq_S * nk_S)
    return s


def span_share(qq_DD: np.ndarray, delta_D: np.ndarray, energy: float = 0.99) -> tuple[float, int]:
    """(share of |delta|^2 inside the span of the leading eigenvectors of ``qq_DD`` holding ``energy`` of its
    trace, number of those directions)."""
    w, V = np.linalg.eigh(qq_DD)
    w, V = w[::-1].clip(min=0), V[:, ::-1]
    if w.sum() <= 0 or not (delta_D @ delta_D) > 0:
        return float("nan"), 0
    r = int(np.searchsorted(np.cumsum(w) / w.sum(), energy - 1e-12) + 1)
    proj = V[:, :r].T @ delta_D
    return float(proj @ proj / (delta_D @ delta_D)), r


def _estimates(s: QGapSums, keep_K: np.ndarray, h: int, G: int, scale: float) -> dict[str, float]:
    """Pre/post-RoPE expected logits (times ``scale``) and gaps of KV head h from the sums of the buckets in
    ``keep_K``."""
    grp = slice(h * G, (h + 1) * G)
    mean_q = s.q_KHqD[keep_K][:, grp].sum((0, 1)) / (s.nq_K[keep_K].sum() * G)
    out = {}
    for mi, m in enumerate(KEY_MODS):
        mean_k = s.k_MKHD[mi][keep_K][:, h].sum(0) / s.nk_MK[mi][keep_K].sum()
        out[f"logit_{m}_pre"] = float(mean_q @ mean_k * scale)
        out[f"logit_{m}_post"] = float(s.pair_MKHq[mi][keep_K][:, grp].sum()
                                       / (s.npair_MK[mi][keep_K].sum() * G) * scale)
    for sp in ("pre", "post"):
        out[f"gap_{sp}"] = out[f"logit_image_{sp}"] - out[f"logit_text_{sp}"]
    return out


def head_rows(s: QGapSums, layer: int, H_heads: list[int], G: int, alpha: float, energy: float,
              scale: float | None = None) -> list[dict]:
    """One row per KV head: expected logits (times ``scale``, default 1/sqrt(D)), gaps with jackknife
    intervals, span share."""
    scale = 1.0 / math.sqrt(s.q_KHqD.shape[-1]) if scale is None else scale
    nonempty = (s.nq_K > 0) | (s.nk_MK.sum(0) > 0)
    g = int(nonempty.sum())
    rows = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for h, head in enumerate(H_heads):
            full = _estimates(s, np.ones_like(nonempty), h, G, scale)
            loo = [_estimates(s, np.arange(len(nonempty)) != k, h, G, scale) for k in np.flatnonzero(nonempty)]
            r = {"layer": layer, "head": head, "logit_scale": scale, "n_buckets": g, "n_text_queries": int(s.nq_K.sum()),
                 "n_image_keys": int(s.nk_MK[0].sum()), "n_text_keys": int(s.nk_MK[1].sum()), **full}
            for sp in ("pre", "post"):
                _, se = jackknife(full[f"gap_{sp}"], np.array([x[f"gap_{sp}"] for x in loo]))
                lo, hi = t_interval(full[f"gap_{sp}"], se, g, alpha)
                r.update({f"gap_{sp}_se": se, f"gap_{sp}_ci_low": lo, f"gap_{sp}_ci_high": hi})
            delta = (s.k_MKHD[0][:, h].sum(0) / s.nk_MK[0].sum() - s.k_MKHD[1][:, h].sum(0) / s.nk_MK[1].sum())
            share, r["span_dims"] = span_share(s.qq_HqDD[h * G:(h + 1) * G].sum(0), delta, energy)
            r.update({"span_share": share, "orthogonal_share": 1 - share,
                      "key_gap_norm": float(np.sqrt(delta @ delta))})
            rows.append(r)
    return rows


def has_queries(ks) -> bool:
    """Whether every committed shard of ``ks`` holding text rows stores query vectors."""
    shards = getattr(ks, "shards", None)
    if not shards:
        return False
    rows = [r for r in shards.values() if r["tokens"].get("text")]
    return bool(rows) and all(r.get("layout") == 1 or "queries" in (r.get("groups") or []) for r in rows)


class _RowBlocks:
    """Rows [lo, hi) of a lazy array as a list of its own blocks: the graph is split once (``to_delayed``),
    so streaming S shards costs O(blocks) in all, where slicing the lazy array per shard costs O(blocks) each.
    Store arrays are concatenations of per-shard blocks, so a shard's rows are whole blocks; a range that cuts
    a block falls back to slicing."""

    def __init__(self, x: da.Array):
        self.x, self.starts = x, np.concatenate([[0], np.cumsum(x.chunks[0])])
        self.blocks = x.to_delayed().reshape(len(x.chunks[0]), -1)[:, 0]

    def rows(self, lo: int, hi: int) -> list:
        a, b = np.searchsorted(self.starts, [lo, hi])
        if a == len(self.starts) or self.starts[a] != lo or self.starts[b] != hi:
            return [self.x[lo:hi]]
        return list(self.blocks[a:b])


def _cat(parts: list[np.ndarray], like: da.Array) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, *like.shape[1:]), like.dtype)


def layer_sums(ks, layer: int, buckets: Buckets, rotary=None) -> QGapSums:
    """Stream the store shard by shard (whole samples each) into the layer's :class:`QGapSums`."""
    from kscale.store.queries import read_queries
    from kscale.store.rope import rope_keys, store_rotary

    m_attrs = ks.attrs["model"]
    H, G, D = len(ks.heads), m_attrs["num_heads"] // m_attrs["num_kv_heads"], ks.head_dim
    rotary = rotary if rotary is not None else store_rotary(ks)
    n_tok = ks.n_tokens()
    mods = [m for m in KEY_MODS if n_tok[m]]
    lazy = {("q", False): read_queries(ks, layer, "text"),
            ("q", True): read_queries(ks, layer, "text", rope=True, rotary=rotary),
            **{(m, False): ks.keys(layer, m) for m in mods},
            **{(m, True): rope_keys(ks, layer, m, rotary=rotary) for m in mods},
            **{(m, "sid"): ks.token_column(m, "sample_id") for m in {"text", *mods}}}
    blocks = {key: _RowBlocks(x) for key, x in lazy.items()}
    total = QGapSums.zeros(buckets.n_buckets, H, G, D)
    at = dict.fromkeys({"text", *mods}, 0)
    for r in ks.shards.values():
        lo = dict(at)
        for m in at:
            at[m] += int(r["tokens"].get(m, 0))
        if at["text"] == lo["text"]:
            continue
        mod_of = {key: "text" if key[0] == "q" else key[0] for key in lazy}
        got = dask.compute({key: b.rows(lo[mod_of[key]], at[mod_of[key]]) for key, b in blocks.items()},
                           scheduler="sync")[0]
        arr = {key: _cat(list(v), lazy[key]) for key, v in got.items()}
        empty = np.zeros((0, H, D))
        kp = {m: arr.get((m, False), empty) for m in KEY_MODS}
        kr = {m: arr.get((m, True), empty) for m in KEY_MODS}
        ks_ = {m: arr.get((m, "sid"), np.zeros(0, np.int64)) for m in KEY_MODS}
        total.merge(shard_sums(arr[("q", False)], arr[("q", True)], arr[("text", "sid")], kp, kr, ks_,
                               buckets, H, G))
    return total


def query_gap(ks, layers: list[int], n_buckets: int, seed: int, alpha: float = 0.05,
              energy: float = 0.99) -> pd.DataFrame:
    """The table of the section "What text queries see": one row per (layer, KV head)."""
    from kscale.store.rope import store_rotary
    from kscale.store.scaling import attention_scale

    m_attrs = ks.attrs["model"]
    G = m_attrs["num_heads"] // m_attrs["num_kv_heads"]
    buckets, rotary = Buckets(n_buckets, seed), store_rotary(ks)
    scale, source = attention_scale(ks.attrs, ks.head_dim)
    rows = []
    for layer in layers:
        rows += head_rows(layer_sums(ks, layer, buckets, rotary), layer, ks.heads, G, alpha, energy, scale)
    return pd.DataFrame(rows).assign(scale_source=source)


def verdict_sentence(table: pd.DataFrame) -> str:
    """Whether the key gap is one text queries can see (post-RoPE, as the model scores)."""
    if table.empty:
        return ""
    lo, hi = table["gap_post_ci_low"], table["gap_post_ci_high"]
    below, above, n = int((hi < 0).sum()), int((lo > 0).sum()), len(table)
    shares = table["span_share"].dropna()
    span = (f"; a median {float(shares.median()):.0%} of the key mean difference lies in the span of text queries"
            if len(shares) else "")
    seen = "text queries can see it" if below + above else "text queries do not see it"
    return (f"Seen from text queries (post-RoPE, as the model scores): image keys score significantly lower than "
            f"text keys in {below} of {n} layer × KV-head cells and higher in {above}{span} — {seen}"
            + ("." if below + above else " in the expected logit."))


# --- the common quantity with the attention statistics stored at extraction ------------------------------------

def causal_logit_means(ks, layer: int, rotary=None) -> pd.DataFrame:
    """Per (sample, stored query head, key modality): the mean post-RoPE logit ``q·k·scale`` over the pairs the
    extraction's attention statistics average (``kscale.attention.stats``, ``logit_mean`` with
    ``queries: after_image``): text queries after the sample's first image token, keys of the modality at or
    before the query (causal). :func:`query_gap` differs on purpose (every stored text query, every pair within
    a sample, pooled over samples), so this restriction is the quantity both can compute; they agree only on a
    store holding every token of a sample (no ``extract.sample_tokens``), whose attention statistics were
    computed over the same keys. Reads the layer in memory: a check for small (debug) stores.

    Columns: sample_id, q_index (position among the stored query heads), modality, logit_mean, n_pairs."""
    from kscale.store.queries import read_queries
    from kscale.store.rope import rope_keys, store_rotary
    from kscale.store.scaling import attention_scale

    rotary = rotary if rotary is not None else store_rotary(ks)
    scale, _ = attention_scale(ks.attrs, ks.head_dim)
    m_attrs = ks.attrs["model"]
    G = m_attrs["num_heads"] // m_attrs["num_kv_heads"]
    q = np.asarray(read_queries(ks, layer, "text", rope=True, rotary=rotary).compute(), np.float64)
    tok = {m: ks.tokens(m) for m in KEY_MODS}
    keys = {m: np.asarray(rope_keys(ks, layer, m, rotary=rotary).compute(), np.float64) for m in KEY_MODS}
    rows = []
    for sid in np.unique(tok["text"]["sample_id"]):
        at = {m: tok[m]["sample_id"] == sid for m in KEY_MODS}
        if not at["image"].any():
            continue
        pos_q = tok["text"]["position"][at["text"]]
        sel = pos_q > tok["image"]["position"][at["image"]].min()
        q_QHqD, pos_q = q[at["text"]][sel], pos_q[sel]
        for m in KEY_MODS:
            k_KHD, pos_k = keys[m][at[m]], tok[m]["position"][at[m]]
            visible_QK = pos_k[None, :] <= pos_q[:, None]
            for i in range(q_QHqD.shape[1]):
                logits_QK = q_QHqD[:, i] @ k_KHD[:, i // G].T * scale
                n = int(visible_QK.sum())
                rows.append({"sample_id": int(sid), "q_index": i, "modality": m, "n_pairs": n,
                             "logit_mean": float(logits_QK[visible_QK].sum() / n) if n else float("nan")})
    return pd.DataFrame(rows)
