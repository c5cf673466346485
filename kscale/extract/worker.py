"""The unit of work of extraction: a plain function of (spec, shard), no Ray in it.

``setup(spec)`` loads the model once per worker; ``run_shard(spec, shard, state)`` reads the shard's
records, runs batched forwards with key hooks, tags and samples tokens, and writes the shard through a
``ShardWriter`` that commits last. Executors (local, Ray) only decide where this runs.

Legend: B batch, T tokens, L hooked layers, H kept KV heads, D head dim, R rope rows, N kept tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from kscale.data import Record, Shard, open_source
from kscale.extract.hooks import capture
from kscale.models import MODALITY_CODES, PAD, LoadedModel, load_model, resolve_layers
from kscale.spec import JobSpec
from kscale.store.writer import ShardCommitted, ShardWriter


@dataclass
class ExtractState:
    loaded: LoadedModel
    layers: list[int]  # model layer indices, ascending
    heads: list[int]  # KV head indices
    source: object


def resolve_heads(heads, n: int) -> list[int]:
    return list(range(n)) if heads == "all" else list(heads)


def setup(spec: JobSpec) -> ExtractState:
    if spec.resources.torch_threads:
        torch.set_num_threads(spec.resources.torch_threads)
    loaded = load_model(spec.model)
    info = loaded.info
    return ExtractState(loaded, resolve_layers(spec.extract.layers, info.num_layers, "extract.layers"),
                        resolve_heads(spec.extract.heads, info.num_kv_heads), open_source(spec.data))


def _error(rec: Record, reason: str) -> dict:
    return {"sample_id": rec.sample_id, "source_id": rec.source_id, "reason": reason}


def keep_mask(modality_BT: torch.Tensor, sample_ids: list[int], sample_tokens) -> torch.Tensor:
    """Which real tokens to store: all, or at most k per (sample, modality), seeded by sample id."""
    keep = modality_BT != PAD
    for name, code in MODALITY_CODES.items():
        k = getattr(sample_tokens, name)
        if k == "all":
            continue
        for b, sid in enumerate(sample_ids):
            idx = torch.nonzero(modality_BT[b] == code).flatten()
            if len(idx) > k:
                rng = np.random.default_rng([sample_tokens.seed, sid, code])
                drop = np.setdiff1d(np.arange(len(idx)), rng.choice(len(idx), size=k, replace=False))
                keep[b, idx[torch.from_numpy(drop)]] = False
    return keep


def build(state: ExtractState, recs: list[Record], with_answers: bool = False):
    """The model batch of some records; answers appended only when asked (attention over the answer span)."""
    lm = state.loaded
    answers = [r.answer or "" for r in recs] if with_answers else None
    return lm.adapter.build_batch(lm, [r.image for r in recs], [r.text for r in recs], answers)


def forward_capture(state: ExtractState, batch, queries: bool = False):
    """Forward one batch with hooks on k_proj (and q_proj if ``queries``) of the chosen layers."""
    lm = state.loaded
    mods = {("k", i): m for i, m in enumerate(lm.adapter.key_modules(lm.model)) if i in state.layers}
    if queries:
        mods.update({("q", i): m for i, m in enumerate(lm.adapter.query_modules(lm.model)) if i in state.layers})
    inputs = {k: v.to(lm.device) for k, v in batch.inputs.items()}
    with torch.inference_mode(), capture(mods, lm.adapter.rotary_module(lm.model)) as cap:
        lm.model(**inputs, use_cache=False)
    return cap


def stacked_keys(state: ExtractState, batch, cap):
    """(keys_LBTHD float32 on CPU for the kept heads, positions_BTR) from a capture."""
    lm = state.loaded
    B, T = batch.inputs["input_ids"].shape
    Hkv, D = lm.info.num_kv_heads, lm.info.head_dim
    keys = torch.stack([cap.outputs[("k", i)] for i in state.layers]).view(len(state.layers), B, T, Hkv, D)
    return keys[:, :, :, state.heads].float().cpu(), cap.positions_BTR.cpu()


def stacked_queries(state: ExtractState, batch, cap) -> torch.Tensor:
    """(L, B, T, H, D) float32 CPU pre-RoPE queries of the query heads reading the kept KV heads."""
    from kscale.store.queries import query_heads

    info = state.loaded.info
    B, T = batch.inputs["input_ids"].shape
    heads = query_heads(state.heads, info.num_heads, info.num_kv_heads)
    q = torch.stack([cap.outputs[("q", i)] for i in state.layers]).view(len(state.layers), B, T, info.num_heads,
                                                                        info.head_dim)
    return q[:, :, :, heads].float().cpu()


def _check_tags(batch) -> None:
    from kscale.models import IMAGE

    got = (batch.modality_BT == IMAGE).sum(1).tolist()
    # an invariant of the adapters: placeholder expansion used the processor's own count
    assert got == batch.n_image_tokens, f"image tokens {got} != processor formula {batch.n_image_tokens}"


def write_batch(writer: ShardWriter, spec: JobSpec, batch, recs: list[Record], keys_LBTHD, pos_BTR) -> None:
    keep = keep_mask(batch.modality_BT, [r.sample_id for r in recs], spec.extract.sample_tokens)
    ids = batch.inputs["input_ids"]
    B, T = ids.shape
    sid_BT = torch.tensor([r.sample_id for r in recs], dtype=torch.int64)[:, None].expand(B, T)
    pos_BT = torch.arange(T, dtype=torch.int32)[None].expand(B, T)
    for name, code in MODALITY_CODES.items():
        m = keep & (batch.modality_BT == code)
        if not m.any():
            continue
        k = keys_LBTHD[:, m]  # (L, N, H, D), rows in (sample, position) order
        if not torch.isfinite(k).all():
            raise ValueError(f"non-finite key values in {name} tokens of samples {[r.sample_id for r in recs]}")
        k = k.numpy().astype(spec.extract.key_dtype)
        if not np.isfinite(k).all():
            raise ValueError(f"keys overflow {spec.extract.key_dtype} in {name} tokens of samples "
                             f"{[r.sample_id for r in recs]}; use extract.key_dtype: float32")
        writer.append(name, k, {
            "sample_id": sid_BT[m].numpy(), "position": pos_BT[m].numpy(),
            "rope_pos": pos_BTR[m].numpy().astype(np.int32), "token_id": ids[m].numpy().astype(np.int32),
            "image_index": batch.image_index_BT[m].numpy(),
        })


def run_shard(spec: JobSpec, shard: Shard, state: ExtractState) -> dict:
    """Extract one shard into the spec's output store and commit it."""
    t0 = time.perf_counter()
    info = state.loaded.info
    try:
        writer = ShardWriter(spec.output.path, shard.name, n_layers=len(state.layers),
                             n_heads=len(state.heads), head_dim=info.head_dim,
                             rope_rows=state.loaded.adapter.rope_rows,
                             key_dtype=spec.extract.key_dtype, chunk_tokens=spec.output.chunk_tokens,
                             compress_keys=spec.output.compress_keys)
    except ShardCommitted as e:  # committed since it was planned (a worker lost after its commit): keep it
        return e.marker
    attn = spec.extract.attention
    qwriter = None
    if attn.store_queries:  # after ShardWriter: its constructor clears a partial shard folder
        from kscale.store.queries import QueryWriter

        qwriter = QueryWriter(spec.output.path, shard.name, dtype=spec.extract.key_dtype,
                              chunk_tokens=spec.output.chunk_tokens)
    with_answers = attn.enabled and attn.queries == "answer"
    errors: list[dict] = []
    good: list[Record] = []
    for i in range(shard.start, shard.stop):
        rec = state.source.get(i)
        (errors.append(_error(rec, rec.error)) if rec.error else good.append(rec))
    n_ok = 0
    bs, max_len = spec.extract.batch_size, spec.extract.max_seq_len
    for a in range(0, len(good), bs):
        recs = good[a: a + bs]
        batch = build(state, recs, with_answers)
        lengths = batch.inputs["attention_mask"].sum(1).tolist()
        too_long = [j for j, n in enumerate(lengths) if n > max_len]
        if too_long:
            for j in reversed(too_long):
                errors.append(_error(recs.pop(j), f"sequence of {lengths[j]} tokens is longer than "
                                                  f"extract.max_seq_len={max_len}"))
            if not recs:
                continue
            batch = build(state, recs, with_answers)
        cap = forward_capture(state, batch, queries=attn.enabled or attn.store_queries)
        keys, pos = stacked_keys(state, batch, cap)
        _check_tags(batch)
        write_batch(writer, spec, batch, recs, keys, pos)
        if qwriter is not None:
            qwriter.append_batch(stacked_queries(state, batch, cap), batch.modality_BT,
                                 keep_mask(batch.modality_BT, [r.sample_id for r in recs], spec.extract.sample_tokens))
        if attn.enabled:
            from kscale.attention.stats import batch_stats

            writer.append_table("attention", batch_stats(state.loaded, state.layers, state.heads, batch, cap, attn,
                                                         [r.sample_id for r in recs]))
        n_ok += len(recs)
    if qwriter is not None:
        qwriter.close()
    errors.sort(key=lambda e: e["sample_id"])
    stats = {"shard": shard.name, "start": shard.start, "stop": shard.stop, "n_samples": shard.stop - shard.start,
             "n_samples_ok": n_ok, "n_errors": len(errors), "seconds": round(time.perf_counter() - t0, 3)}
    return writer.commit(stats, errors)
