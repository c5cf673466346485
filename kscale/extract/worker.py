"""The unit of work of extraction: a plain function of (spec, shard), no Ray in it.

``setup(spec)`` loads the model once per worker (with ``extract.adapter`` applied); ``run_shard(spec, shard, state)`` reads the shard's
records, runs batched forwards with hooks on the projections of ``extract.vectors`` (q, k, v), tags and samples tokens, and writes the shard through a
``ShardWriter`` that commits last. Executors (local, Ray) only decide where this runs.

Two paths write the same store. The default (``ExtractState.overlap``) is a pipeline: the hooks of
:func:`kscale.extract.hooks.capture_keys` select the kept tokens and heads on the device that computed
them (on a GPU they also cast there), copy to the host without stalling the forward, and one writer thread
per worker (the *drain*) waits for those copies (on CPU: casts and checks the batch's block), appends to the
``ShardWriter`` and finally commits, while the main
thread already runs the next forwards. ``start_shard`` returns the commit as a ``Future``: an executor
that calls it for shard k+1 before resolving shard k's future overlaps k's commit with k+1's forwards,
and reports shard k done only when the future resolved (the marker is on disk). The synchronous path
(``overlap=False``, and always with attention statistics) gathers full outputs with
:func:`kscale.extract.hooks.capture` and is the reference the tests compare against.

Legend: B batch, T tokens, L hooked layers, H kept KV heads, D head dim, R rope rows, N kept tokens.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import ExitStack
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from kscale.adapters import apply_adapter
from kscale.data import Record, Shard, open_source
from kscale.data.lineindex import index_dir
from kscale.extract.hooks import NONFINITE, OVERFLOW, HostKeys, capture, capture_keys
from kscale.models import MODALITY_CODES, PAD, LoadedModel, load_model, resolve_layers
from kscale.models.inputs import Sample
from kscale.spec import JobSpec
from kscale.store.writer import ShardCommitted, ShardWriter

# Batches whose keys may wait for the drain thread at once; bounds host memory (and pinned buffers).
MAX_IN_FLIGHT = 2
# Extraction needs no logits: the LM head runs on the last position only (at 152k vocab it is ~7% of a
# 7B forward and B x T x vocab of memory). Benchmarks pass the same to their plain forward.
FORWARD_KWARGS = {"use_cache": False, "logits_to_keep": 1}


@dataclass
class ExtractState:
    loaded: LoadedModel
    layers: list[int]  # model layer indices, ascending
    heads: list[int]  # KV head indices
    source: object
    overlap: bool = True  # the pipelined path; False: the synchronous reference path
    streams: dict = field(default_factory=dict)  # one CUDA copy stream per device, reused across batches
    drain: ThreadPoolExecutor | None = None  # the writer thread, created at the first pipelined shard

    def drain_pool(self) -> ThreadPoolExecutor:
        if self.drain is None:
            self.drain = ThreadPoolExecutor(1, thread_name_prefix="kscale-drain")
        return self.drain


def resolve_heads(heads, n: int) -> list[int]:
    return list(range(n)) if heads == "all" else list(heads)


def setup(spec: JobSpec) -> ExtractState:
    """Load the model once per worker and apply ``extract.adapter`` (if any) before anything is hooked: the
    adapter replaces the projections in place (:func:`kscale.adapters.apply_adapter`), so the modules
    :func:`vector_modules` returns afterwards are the adapted ones and the stored vectors include the
    low-rank update. MaLoRA's gate reads each forward's modality mask from that call's ``input_ids`` (the
    pre-hook :class:`kscale.adapters.MaLoRAModel` registers), as in the bias and eval stages."""
    if spec.resources.torch_threads:
        torch.set_num_threads(spec.resources.torch_threads)
    loaded = load_model(spec.model, n_devices=max(1, int(spec.resources.gpus_per_worker)))
    apply_adapter(loaded, spec.extract.adapter)
    info = loaded.info
    return ExtractState(loaded, resolve_layers(spec.extract.layers, info.num_layers, "extract.layers"),
                        resolve_heads(spec.extract.heads, info.num_kv_heads),
                        open_source(spec.data, index_dir(spec.output.path)))  # the driver's indexes


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
    if with_answers:  # a record without an answer still gets an (empty) answer span to attend from
        samples = [r.sample() if r.answer or r.turns else Sample.simple(r.image, r.text, "") for r in recs]
    else:
        samples = [r.sample(with_answer=False) for r in recs]
    return lm.adapter.batch(lm, samples)


def vector_modules(lm: LoadedModel, kind: str) -> list[torch.nn.Module]:
    """The adapter's projection modules of one kind ("q", "k", "v"), one per decoder layer."""
    return {"q": lm.adapter.query_modules, "k": lm.adapter.key_modules, "v": lm.adapter.value_modules}[kind](lm.model)


def forward_capture(state: ExtractState, batch, queries: bool = False, kinds: tuple[str, ...] = ("k",)):
    """Forward one batch with hooks on the projections of ``kinds`` (k_proj; q_proj too if ``queries``) of
    the chosen layers; outputs keyed ``(kind, layer)``."""
    lm = state.loaded
    kinds = tuple(dict.fromkeys(("k", *kinds, *(("q",) if queries else ()))))
    mods = {(kind, i): m for kind in kinds for i, m in enumerate(vector_modules(lm, kind)) if i in state.layers}
    inputs = {k: v.to(lm.device) for k, v in batch.inputs.items()}
    with torch.inference_mode(), capture(mods, lm.adapter.rotary_module(lm.model)) as cap:
        lm.model(**inputs, **FORWARD_KWARGS)
    return cap


def kind_heads(state: ExtractState, kind: str) -> tuple[int, list[int]]:
    """(heads the projection of ``kind`` outputs, the ones stored): query heads reading the kept KV heads for
    q, the kept KV heads for k and v."""
    from kscale.store.queries import query_heads

    info = state.loaded.info
    if kind == "q":
        return info.num_heads, query_heads(state.heads, info.num_heads, info.num_kv_heads)
    return info.num_kv_heads, state.heads


def stacked(state: ExtractState, batch, cap, kind: str) -> torch.Tensor:
    """(L, B, T, H, D) float32 CPU vectors of one kind for its stored heads, from a capture."""
    B, T = batch.inputs["input_ids"].shape
    n, heads = kind_heads(state, kind)
    # per layer to the host first: with a model spread over GPUs each layer's output is on its own device
    v = torch.stack([cap.outputs[(kind, i)].cpu() for i in state.layers]).view(len(state.layers), B, T, n, -1)
    return v[:, :, :, heads].float()


def stacked_keys(state: ExtractState, batch, cap):
    """(keys_LBTHD float32 on CPU for the kept heads, positions_BTR) from a capture."""
    return stacked(state, batch, cap, "k"), cap.positions_BTR.cpu()


def stacked_queries(state: ExtractState, batch, cap) -> torch.Tensor:
    """(L, B, T, H, D) float32 CPU pre-RoPE queries of the query heads reading the kept KV heads."""
    return stacked(state, batch, cap, "q")


def _check_tags(batch) -> None:
    from kscale.models import IMAGE

    got = (batch.modality_BT == IMAGE).sum(1).tolist()
    # an invariant of the adapters: placeholder expansion used the processor's own count
    assert got == batch.n_image_tokens, f"image tokens {got} != processor formula {batch.n_image_tokens}"


def _check_finite(v: torch.Tensor | np.ndarray, what: str, modality: str, recs: list[Record], key_dtype: str) -> None:
    if isinstance(v, torch.Tensor) and not torch.isfinite(v).all():
        raise ValueError(f"non-finite {what} values in {modality} tokens of samples {[r.sample_id for r in recs]}")
    if isinstance(v, np.ndarray) and not np.isfinite(v).all():
        raise ValueError(f"{what}s overflow {key_dtype} in {modality} tokens of samples "
                         f"{[r.sample_id for r in recs]}; use extract.key_dtype: float32")


def write_batch(writer: ShardWriter, spec: JobSpec, batch, recs: list[Record], keys_LBTHD, pos_BTR,
                vectors: dict[str, torch.Tensor] | None = None) -> None:
    """Append a batch's kept rows: keys, their token columns and ``vectors`` (kind -> (L, B, T, H, D): the
    q/v the writer writes), each checked finite and cast to ``extract.key_dtype``."""
    keep = keep_mask(batch.modality_BT, [r.sample_id for r in recs], spec.extract.sample_tokens)
    ids = batch.inputs["input_ids"]
    B, T = ids.shape
    sid_BT = torch.tensor([r.sample_id for r in recs], dtype=torch.int64)[:, None].expand(B, T)
    pos_BT = torch.arange(T, dtype=torch.int32)[None].expand(B, T)
    dtype = spec.extract.key_dtype
    for name, code in MODALITY_CODES.items():
        m = keep & (batch.modality_BT == code)
        if not m.any():
            continue
        out = {}
        for kind, v_LBTHD in {"k": keys_LBTHD, **(vectors or {})}.items():
            v = v_LBTHD[:, m]  # (L, N, H, D), rows in (sample, position) order
            what = {"q": "query", "k": "key", "v": "value"}[kind]
            _check_finite(v, what, name, recs, dtype)
            out[kind] = v.numpy().astype(dtype)
            _check_finite(out[kind], what, name, recs, dtype)
        writer.append(name, out.pop("k"), {
            "sample_id": sid_BT[m].numpy(), "position": pos_BT[m].numpy(),
            "rope_pos": pos_BTR[m].numpy().astype(np.int32), "token_id": ids[m].numpy().astype(np.int32),
            "image_index": batch.image_index_BT[m].numpy(), **{k: v[m.numpy()] for k, v in video_columns(batch).items()},
        }, out)


def video_columns(batch) -> dict[str, np.ndarray]:
    """The store's video columns (``VIDEO_FIELDS``) of a batch, (B, T) each: video, frame, time in ms (-1 outside)."""
    if batch.time_BT is None:  # no video in the batch
        return {}
    t = batch.time_BT.numpy()
    return {"video_index": batch.video_index_BT.numpy(), "frame": batch.frame_BT.numpy(),
            "time_ms": np.where(np.isnan(t), -1, np.round(np.nan_to_num(t) * 1000)).astype(np.int32)}


def keep_rows(batch, recs: list[Record], sample_tokens) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """Flat (B*T) indices of the stored tokens, grouped by modality, and each modality's [a, b) span.

    Within a modality rows are in (sample, position) order, the order ``write_batch`` stores them in."""
    keep = keep_mask(batch.modality_BT, [r.sample_id for r in recs], sample_tokens).flatten()
    mod = batch.modality_BT.flatten()
    parts, spans, a = [], {}, 0
    for name, code in MODALITY_CODES.items():
        idx = torch.nonzero(keep & (mod == code)).flatten()
        if len(idx):
            parts.append(idx)
            spans[name] = (a, a + len(idx))
            a += len(idx)
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)), spans


def forward_keys(state: ExtractState, batch, rows_N: torch.Tensor, key_dtype: str,
                 kinds: tuple[str, ...] = ("k",)) -> dict[str, HostKeys]:
    """Forward one batch; the hooks leave the kept vectors of each kind in host buffers (copies may still be
    in flight). Keys' buffers also get the RoPE positions."""
    lm = state.loaded
    inputs = {k: v.to(lm.device) for k, v in batch.inputs.items()}
    got = {}
    with torch.inference_mode(), ExitStack() as stack:
        for kind in kinds:
            all_mods = vector_modules(lm, kind)
            mods = {j: all_mods[i] for j, i in enumerate(state.layers)}
            n, heads = kind_heads(state, kind)
            got[kind] = stack.enter_context(capture_keys(
                mods, lm.adapter.rotary_module(lm.model) if kind == "k" else None, rows_N, n,
                None if heads == list(range(n)) else heads, getattr(torch, key_dtype), state.streams))
        lm.model(**inputs, **FORWARD_KWARGS)
    return {kind: g.value for kind, g in got.items()}


def write_host_keys(writer: ShardWriter, spec, batch, recs: list[Record], rows_N: torch.Tensor,
                    spans: dict[str, tuple[int, int]], host: dict[str, HostKeys]) -> None:
    """On the drain thread: wait for the batch's copies, check them, append each modality's rows."""
    for h in host.values():
        h.wait()
    T = batch.inputs["input_ids"].shape[1]
    rows = rows_N.numpy()
    sids = np.array([r.sample_id for r in recs], dtype=np.int64)
    cols_N = {"sample_id": sids[rows // T], "position": (rows % T).astype(np.int32),
              "rope_pos": host["k"].positions_NR.numpy(),
              "token_id": batch.inputs["input_ids"].flatten().numpy()[rows].astype(np.int32),
              "image_index": batch.image_index_BT.flatten().numpy()[rows],
              **{k: v.flatten()[rows] for k, v in video_columns(batch).items()}}
    for name, (a, b) in spans.items():
        for kind, h in host.items():
            bad = int(np.bitwise_or.reduce(h.flags_LN.numpy()[:, a:b], axis=None))
            what = {"q": "query", "k": "key", "v": "value"}[kind]
            if bad & NONFINITE:
                raise ValueError(f"non-finite {what} values in {name} tokens of samples {[r.sample_id for r in recs]}")
            if bad & OVERFLOW:
                raise ValueError(f"{what}s overflow {spec.extract.key_dtype} in {name} tokens of samples "
                                 f"{[r.sample_id for r in recs]}; use extract.key_dtype: float32")
        writer.append(name, host["k"].keys_LNHD.numpy()[:, a:b], {k: v[a:b] for k, v in cols_N.items()},
                      {kind: h.keys_LNHD.numpy()[:, a:b] for kind, h in host.items() if kind != "k"})


def _writer(spec: JobSpec, shard: Shard, state: ExtractState) -> ShardWriter:
    """The shard's writer; raises ``ShardCommitted`` when the shard was committed since it was planned."""
    info = state.loaded.info
    return ShardWriter(spec.output.path, shard.name, n_layers=len(state.layers),
                       n_heads=len(state.heads), head_dim=info.head_dim, rope_rows=state.loaded.adapter.rope_rows,
                       key_dtype=spec.extract.key_dtype, chunk_tokens=spec.output.chunk_tokens,
                       compress_keys=spec.output.compress_keys, vectors=spec.extract.kinds)


def usable_batches(source, shard: Shard, batch_size: int, errors: list[dict]) -> Iterator[list[Record]]:
    """The shard's usable records, ``batch_size`` at a time, read (and their images decoded) only when their
    batch is due: at most one batch of decoded images is alive. Unusable records go to ``errors``. The
    batches are those of the shard's usable records in order, whatever the errors (same as reading all first)."""
    batch: list[Record] = []
    for i in range(shard.start, shard.stop):
        rec = source.get(i)
        if rec.error:
            errors.append(_error(rec, rec.error))
            continue
        batch.append(rec)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _batches(spec, shard: Shard, state: ExtractState, errors: list[dict],
             with_answers: bool) -> Iterator[tuple[list[Record], object]]:
    """(records, model batch) of the shard's usable samples; bad and too-long samples go to ``errors``."""
    bs, max_len = spec.extract.batch_size, spec.extract.max_seq_len
    for recs in usable_batches(state.source, shard, bs, errors):
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
        _check_tags(batch)
        yield recs, batch


def _stats(shard: Shard, n_ok: int, errors: list[dict], t0: float) -> dict:
    errors.sort(key=lambda e: e["sample_id"])
    return {"shard": shard.name, "start": shard.start, "stop": shard.stop, "n_samples": shard.stop - shard.start,
            "n_samples_ok": n_ok, "n_errors": len(errors), "seconds": round(time.perf_counter() - t0, 3)}


def start_shard(spec: JobSpec, shard: Shard, state: ExtractState) -> Future:
    """Run the shard's forwards now; return a ``Future`` of its commit marker (see the module docstring).

    The future resolves after the marker is written; a failed append or commit raises from it. When this
    function itself raises, nothing of the shard is still being written."""
    attn = spec.extract.attention
    done: Future = Future()
    if not state.overlap or attn.enabled:
        done.set_result(_run_sync(spec, shard, state))
        return done
    t0 = time.perf_counter()
    try:
        writer = _writer(spec, shard, state)
    except ShardCommitted as e:  # committed since it was planned (a worker lost after its commit): keep it
        done.set_result(e.marker)
        return done
    drain = state.drain_pool()
    errors: list[dict] = []
    appends: deque[Future] = deque()
    n_ok = 0
    try:
        for recs, batch in _batches(spec, shard, state, errors, with_answers=False):
            rows_N, spans = keep_rows(batch, recs, spec.extract.sample_tokens)
            host = forward_keys(state, batch, rows_N, spec.extract.key_dtype, spec.extract.kinds)
            appends.append(drain.submit(write_host_keys, writer, spec, batch, recs, rows_N, spans, host))
            n_ok += len(recs)
            while len(appends) > MAX_IN_FLIGHT:
                appends.popleft().result()  # back-pressure; a failed append raises here
    except BaseException:
        for f in appends:  # let this shard's queued appends finish, then give its staging folder up
            f.exception()
        writer.abort()
        raise

    def commit() -> dict:
        try:
            for f in appends:  # done already (one thread, in order); re-raise a failed append before any marker
                f.result()
        except BaseException:
            writer.abort()
            raise
        return writer.commit(_stats(shard, n_ok, errors, t0), errors)  # a failed commit removes its staging

    return drain.submit(commit)


def run_shard(spec: JobSpec, shard: Shard, state: ExtractState) -> dict:
    """Extract one shard into the spec's output store and commit it; returns the marker."""
    return start_shard(spec, shard, state).result()


def _run_sync(spec: JobSpec, shard: Shard, state: ExtractState) -> dict:
    """The synchronous path: full projection outputs to the host, then select, cast and write in turn."""
    t0 = time.perf_counter()
    try:
        writer = _writer(spec, shard, state)
    except ShardCommitted as e:  # committed since it was planned (a worker lost after its commit): keep it
        return e.marker
    attn = spec.extract.attention
    kinds = spec.extract.kinds
    errors: list[dict] = []
    n_ok = 0
    try:
        for recs, batch in _batches(spec, shard, state, errors, attn.enabled and attn.queries == "answer"):
            cap = forward_capture(state, batch, queries=attn.enabled, kinds=kinds)
            keys, pos = stacked_keys(state, batch, cap)
            write_batch(writer, spec, batch, recs, keys, pos,
                        {k: stacked(state, batch, cap, k) for k in kinds if k != "k"})
            if attn.enabled:
                from kscale.attention.stats import batch_stats

                writer.append_table("attention", batch_stats(state.loaded, state.layers, state.heads, batch, cap,
                                                             attn, [r.sample_id for r in recs]))
            n_ok += len(recs)
    except BaseException:
        writer.abort()  # the shard is given up: its staging folder goes now, not when the writer is collected
        raise
    return writer.commit(_stats(shard, n_ok, errors, t0), errors)
